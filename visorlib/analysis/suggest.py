"""A first VISOR layer plan read off the measurements (``visorlib analyze --suggest-plan``).

This is a **heuristic**, the paper's reasoning (§3) turned into a rule; it gives a starting plan
to train and evaluate, not a guarantee:

* **Cross-attention layers where the answer looks at the image.** The answer→image share per
  layer (averaged over the groups measured) peaks in a saw-tooth (Fig. 2); a layer that is a local
  maximum of that curve and reaches at least ``peak_fraction`` of its largest value becomes a CA
  layer. Those are the layers whose image reads the answer depends on; the troughs between them
  are where dropping the image costs least.
* **Self-attention candidates at the CKA stage boundaries.** Visual tokens change in stages
  (Fig. 3: blocks of high mutual CKA). Walking the layer boundaries in order, a new stage starts
  where the CKA to the current stage's first state falls below ``stage_threshold``; the layer that
  produced the change becomes an SA candidate (the layer that refines the visual tokens). The
  measured group with the lowest CKA (the hardest one) decides, since its refinements are the
  ones an easy task can skip but a hard one cannot. The state leaving the last layer is left out:
  in a causal decoder no later layer reads it, so a change there is never worth an SA layer.
* **Configurations** are the nested prefixes of the SA candidates (``[]``, ``[s1]``,
  ``[s1, s2]`` ...): the router can then buy stages in order.

The reference case is the paper's LLaVA-OV 0.5B plan (``zoo/visor-llava-ov-0.5b.yaml``: CA at
``0, 3, ..., 21``, SA candidates at ``1, 4, ..., 22``), chosen from the same three measurements on
real data with a regular spacing; this rule does not reproduce a regular grid, it follows the
curves of the model and data it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from ..config import VisorConfig
from ..visor.plan import LayerPlan


def stage_boundaries(cka: Sequence[Sequence[float]], threshold: float = 0.9) -> list[int]:
    """Layers that start a new stage of the visual representation.

    Args:
        cka: ``[layers + 1, layers + 1]`` CKA between layer boundaries (state ``i`` enters layer ``i``).
        threshold: A state whose CKA to the current stage's first state is below this opens a stage.

    Returns:
        The layers ``i - 1`` whose output ``i`` opened a stage, ascending. The last state (leaving
        the last layer, read by no layer) is not considered.
    """
    first, out = 0, []
    for state in range(1, len(cka) - 1):
        value = cka[first][state]
        if value is not None and value == value and value < threshold:  # value == value: not NaN
            out.append(state - 1)
            first = state
    return out


def attention_peaks(curve: Sequence[float], peak_fraction: float = 0.5) -> list[int]:
    """Local maxima of a per-layer curve that reach ``peak_fraction`` of its largest value."""
    values = [v if v == v else 0.0 for v in curve]  # NaN (no answer token) counts as no attention
    top = max(values, default=0.0)
    if top <= 0:
        return []
    peaks = []
    for i, v in enumerate(values):
        left = values[i - 1] if i > 0 else float("-inf")
        right = values[i + 1] if i + 1 < len(values) else float("-inf")
        if v >= left and v >= right and v >= peak_fraction * top:
            peaks.append(i)
    return peaks


def suggest_plan(answer_image: Sequence[float], cka: Sequence[Sequence[float]], num_layers: int,
                 stage_threshold: float = 0.9, peak_fraction: float = 0.5) -> dict:
    """The suggested ``visor:`` section, validated as a :class:`~visorlib.visor.plan.LayerPlan`.

    Args:
        answer_image: Answer→image share per layer.
        cka: CKA between layer boundaries of the group that decides the SA candidates.
        num_layers: Decoder depth.
        stage_threshold: See :func:`stage_boundaries`.
        peak_fraction: See :func:`attention_peaks`.

    Returns:
        ``{"ca_layers", "sa_layers", "configurations", "default", "cross_attention_init"}``.
    """
    sa = stage_boundaries(cka, stage_threshold)
    ca = [i for i in attention_peaks(answer_image, peak_fraction) if i not in sa]
    if not ca:
        # Every peak is also a stage boundary: read the image in the best remaining layer.
        rest = [i for i in range(num_layers) if i not in sa]
        ca = [max(rest, key=lambda i: answer_image[i] if answer_image[i] == answer_image[i] else 0.0)] if rest else []
    configurations = [sa[:n] for n in range(len(sa) + 1)]
    # Separate lists: yaml.safe_dump would write a shared list as an anchor (&id001), unreadable to a user.
    section = {"ca_layers": ca, "sa_layers": list(sa), "configurations": configurations, "default": list(sa),
               "cross_attention_init": "copy"}
    LayerPlan(num_layers, VisorConfig(**section))  # a suggestion must be a loadable plan
    return section


def plan_yaml(section: dict, note: str = "") -> str:
    """The ``visor:`` card fragment as YAML, headed by a comment saying where it comes from."""
    head = ("# Suggested by `visorlib analyze --suggest-plan` (a heuristic, docs/analysis.md):\n"
            "# CA where answer->image attention peaks, SA candidates at CKA stage boundaries.\n")
    if note:
        head += "".join(f"# {line}\n" for line in note.splitlines())
    body = yaml.safe_dump({"visor": section}, default_flow_style=None, sort_keys=False)
    return head + body
