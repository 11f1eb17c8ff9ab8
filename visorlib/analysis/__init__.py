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

The names below load on first use (PEP 562): ``visorlib --help`` registers ``visorlib analyze``
(:mod:`.cli`) without loading torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "KEY_GROUPS": "attention", "SOURCES": "attention", "AttentionProbe": "attention",
    "TokenGroups": "attention", "answer_positions": "attention", "measure_batch": "attention",
    "cka_matrix": "cka", "linear_cka": "cka",
    "correlation": "layer_drop", "drop_request": "layer_drop", "droppable_layers": "layer_drop",
    "easy_hard": "layer_drop", "random_subsets": "layer_drop",
    "analyze": "run", "load_samples": "run",
    "plan_yaml": "suggest", "suggest_plan": "suggest",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
