"""In-LLM token reduction inside the executor: score visual tokens at a layer, drop the rest.

FastV and PyramidDrop (:mod:`visorlib.visor.reduction`) drop visual tokens at given decoder layers,
ranked by the attention chosen text queries pay them. Two rules keep this fast and exact:

* **Scores without the attention matrix.** The decoder layers keep running SDPA / flash attention;
  the score is recomputed from the scoring layer's *input*: its input norm, ``q`` of the last
  prompt token only (``[B, H, 1, d]``) and ``k`` of every token, then
  :func:`~visorlib.visor.reduction.query_attention` forms ``[B, H, 1, L]`` logits — what the layer's own
  softmax row of that query is, to float rounding. The cost is one ``k`` projection of the
  sequence per scoring layer (a few per cent of a layer).
* **Dropping is compaction.** From the pruning layer on, each sample's sequence holds its text
  and its kept visual tokens only (left-padded again to the longest sample), every token at its
  original rotary position, so later layers cost less and the KV cache of those layers holds only
  kept tokens. Dropped visual positions come out of the pass with zero hidden states (no logits).

Pruning happens once, in the prefill; decode steps attend over what each layer's cache holds, so
cached generation equals recomputing the full forward under the same rule. Under a VISOR plan the
visual stream is what shrinks: later cross-attention and executed self-attention layers see only
the kept tokens. The score is defined the same way whatever the layer's role (the layer's
projections applied to the current states), although a text-only layer never attends to visual
tokens itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modules.layers import apply_rotary
from .reduction import (
    FastV,
    PyramidDrop,
    Reducer,
    ReductionSpecError,
    fastv_select,
    prune_points,
    pyramiddrop_select,
    query_attention,
)
from .streams import gather_tokens


class Pruning:
    """The in-LLM reducers of one forward pass, applied layer by layer by the executor.

    Args:
        reducers: In-LLM reducers (FastV / PyramidDrop), applied in order.
        num_layers: Decoder depth (checked against every reducer's layers).
    """

    def __init__(self, reducers: Sequence[Reducer], num_layers: int):
        self.num_layers = num_layers
        self.points = []  # (reducer, point) in layer order
        for reducer in reducers:
            if not isinstance(reducer, (FastV, PyramidDrop)):
                raise ReductionSpecError(f"{reducer.name} is not an in-LLM method")
            self.points += [(reducer, point) for point in prune_points(reducer, num_layers)]
        self.points.sort(key=lambda item: (item[1].layer, item[1].score_layer))
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._entering: torch.Tensor | None = None  # visual tokens per sample entering the LLM

    def before_layer(self, state, index: int, layer: nn.Module) -> None:
        """Score at a scoring layer (from its input), drop at a pruning layer (before it runs)."""
        for number, (reducer, point) in enumerate(self.points):
            if point.score_layer == index:
                self._pending[number] = self._select(state, layer, reducer, point.stage)
            if point.layer == index:
                state.keep_visual(*self._pending.pop(number))

    def _select(self, state, layer: nn.Module, reducer: Reducer, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        valid = state.layout.visual_valid
        if self._entering is None:
            self._entering = valid.sum(1)
        scores = last_token_scores(state, layer)
        if isinstance(reducer, FastV):
            return fastv_select(scores, valid, reducer, self.num_layers)
        return pyramiddrop_select(scores, valid, reducer, self.num_layers, stage, self._entering)


def last_token_scores(state, layer: nn.Module) -> torch.Tensor:
    """``[B, V]`` attention the last prompt token pays each visual token, in ``layer``, from its input.

    The executor's batches are left-padded, so the last position is every sample's last token.
    """
    batch, length = state.visual_mask.shape
    last = torch.full((batch, 1), length - 1, device=state.visual_mask.device)
    q, k = layer_queries_keys(state, layer, last)
    layout = state.layout
    return query_attention(q, k, last, state.new_mask.bool(), layout.visual_index, layout.visual_valid)


def layer_queries_keys(state, layer: nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s queries at ``positions`` and keys at every position, recomputed from its input.

    What the layer's own attention computes (input norm, projections, rotary), without asking it
    for its attention matrix: the layer keeps running SDPA. Token reduction (the last prompt token)
    and ``visorlib.analysis`` (every query and answer token) read attention through this.

    Args:
        state: The executor's state before ``layer`` runs (merged form in original order).
        layer: A decoder layer with ``input_layernorm`` and ``self_attn``.
        positions: ``[B, Q]`` sequence positions of the queries; ``L`` (one past the end) marks a
            padded slot, whose query is zero.

    Returns:
        ``(q [B, Hq, Q, d], k [B, Hkv, L, d])``, rotary applied.
    """
    attn = layer.self_attn
    hidden = layer.input_layernorm(state.merged())
    cos, sin = state.full_rope()
    rows = gather_tokens(hidden, positions)
    q = apply_rotary(attn.split_heads(attn.q_proj(rows), attn.num_heads), gather_tokens(cos, positions),
                     gather_tokens(sin, positions))
    k = apply_rotary(attn.split_heads(attn.k_proj(hidden), attn.num_kv_heads), cos, sin)
    return q, k
