"""The paper's §3 measurements for any model and data: where the model looks, how its visual tokens
change, and what dropping vision costs — and a first VISOR layer plan read off them.

* :mod:`.attention` — attention shares per layer and interaction type (query→image, answer→image,
  answer→query; the CA update of a VISOR model's cross-attention layers), exact, computed from each
  layer's recomputed queries and keys while the model keeps its SDPA attention;
* :mod:`.cka` — pairwise linear CKA of the visual tokens' hidden states across layers;
* :mod:`.layer_drop` — accuracy with vision dropped from random layer subsets (a plan-level request
  the executor runs as text-only layers), the dataset correlation and the easy / hard split;
* :mod:`.suggest` — a heuristic ``visor:`` section: CA at answer→image peaks, SA at CKA stage boundaries;
* :mod:`.run` — the whole report over evaluation data; :mod:`.plots` its figures; :mod:`.cli` the
  ``visorlib analyze`` command.

Read ``docs/analysis.md`` for what each measurement means and how to read the figures.
"""

from .attention import KEY_GROUPS, SOURCES, AttentionProbe, TokenGroups, answer_positions, measure_batch
from .cka import cka_matrix, linear_cka
from .layer_drop import correlation, drop_request, droppable_layers, easy_hard, random_subsets
from .run import analyze, load_samples
from .suggest import plan_yaml, suggest_plan

__all__ = [
    "KEY_GROUPS",
    "SOURCES",
    "AttentionProbe",
    "TokenGroups",
    "analyze",
    "answer_positions",
    "cka_matrix",
    "correlation",
    "drop_request",
    "droppable_layers",
    "easy_hard",
    "linear_cka",
    "load_samples",
    "measure_batch",
    "plan_yaml",
    "random_subsets",
    "suggest_plan",
]
