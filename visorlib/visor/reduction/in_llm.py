"""In-LLM token reduction: which visual tokens survive at which decoder layer.

Both methods drop visual tokens inside the language model, scored by how much chosen text
queries attend to them (:func:`~visorlib.visor.reduction.scores.query_attention`):

- **FastV** (scores of the *last* token of the prompt, read from the attention of layer K-1; the
  tokens kept from layer K on). Why the last token: the FastV paper motivates the rule with the
  average attention a visual token receives, but its released code (``FASTV_k`` branch of its
  ``LlamaModel.forward``) takes the previous layer's attention averaged over heads and reads the
  row of the last query (``last_layer_attention_avg[-1]``); we follow the code, which is what its
  published numbers measured. In the prefill the last token is the end of the prompt.
- **PyramidDrop** (at the first layer of each stage, the last instruction token's query of *that*
  layer against every key, as the paper's appendix L describes; the top tokens for the stage kept).

Functions here are batch-first with padding: a sample's visual tokens are ``[B, V]`` slots with a
validity mask (samples have different numbers of visual tokens), and a selection returns a padded
index tensor plus per-sample lengths. There is no batch-size-1 path: each row is computed from
its own scores and count only, so a sample in a batch gets exactly what it gets alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .spec import FastV, PyramidDrop, Reducer, ReductionSpecError, resolve_keep


@dataclass(frozen=True)
class PrunePoint:
    """One place where an in-LLM reducer drops visual tokens.

    Attributes:
        layer: Decoder layer (0-indexed) that is the first to see only the kept tokens.
        score_layer: Layer whose queries and keys score the tokens: ``layer - 1`` for FastV (the
            attention that just ran), ``layer`` for PyramidDrop (the attention about to run).
        stage: Index of the stage (PyramidDrop) or 0.
    """

    layer: int
    score_layer: int
    stage: int = 0


def prune_points(spec: Reducer, num_layers: int) -> list[PrunePoint]:
    """Where ``spec`` prunes in a ``num_layers``-layer decoder (empty for pre-LLM methods).

    Raises:
        ReductionSpecError: A layer of the spec is outside the decoder.
    """
    if isinstance(spec, FastV):
        spec.check_layers(num_layers)
        return [PrunePoint(spec.layer, spec.layer - 1)]
    if isinstance(spec, PyramidDrop):
        stages = spec.stages(num_layers, 1)
        # A stage that keeps everything (the first, ratio 1.0) drops nothing, but still counts.
        return [PrunePoint(layer, layer, i) for i, (layer, _) in enumerate(stages) if i > 0 or spec.ratios[0] < 1.0]
    return []


def keep_counts(spec: Reducer, n_visual: Sequence[int] | torch.Tensor, num_layers: int, stage: int = 0) -> list[int]:
    """Visual tokens each sample keeps at prune point ``stage`` of ``spec``.

    Args:
        spec: FastV or PyramidDrop.
        n_visual: Each sample's visual tokens entering the LLM (before any in-LLM pruning).
        num_layers: Decoder depth (PyramidDrop's default stages depend on it).
        stage: PyramidDrop stage index (0 for FastV).

    Raises:
        ReductionSpecError: A count ``keep`` larger than a sample's visual tokens (naming the sample).
    """
    counts = n_visual.tolist() if isinstance(n_visual, torch.Tensor) else list(n_visual)
    out = []
    for i, n in enumerate(counts):
        try:
            if isinstance(spec, FastV):
                out.append(resolve_keep(spec.keep, n, f"sample {i}") if n else 0)
            elif isinstance(spec, PyramidDrop):
                out.append(spec.stages(num_layers, n)[stage][1] if n else 0)
            else:
                raise ReductionSpecError(f"{spec.name} is not an in-LLM method")
        except ReductionSpecError as err:
            raise ReductionSpecError(f"{spec.name}, sample {i}: {err}") from None
    return out


def select_top(scores: torch.Tensor, valid: torch.Tensor, counts: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the ``counts[b]`` highest-scoring valid visual slots, in their original order.

    Args:
        scores: ``[B, V]`` scores (higher = keep).
        valid: ``[B, V]`` bool, False at padded slots (never selected).
        counts: Tokens to keep per sample; at most that sample's valid slots.

    Returns:
        ``(indices, lengths)``: ``[B, K]`` long slot indices ascending, padded with -1 past
        ``lengths[b]`` (K = the largest count), and ``[B]`` long lengths.
    """
    b, v = scores.shape
    device = scores.device
    counts_t = torch.as_tensor(counts, dtype=torch.long, device=device).reshape(b)
    n_valid = valid.sum(dim=1)
    over = (counts_t > n_valid).nonzero()
    if over.numel():
        i = int(over[0, 0])
        raise ReductionSpecError(f"sample {i}: cannot keep {int(counts_t[i])} of its {int(n_valid[i])} visual tokens")
    masked = scores.float().masked_fill(~valid.bool(), float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(v, device=device).expand(b, v))
    keep = (rank < counts_t[:, None]) & valid.bool()
    width = int(counts_t.max()) if b else 0
    pos = torch.arange(v, device=device).expand(b, v)
    indices = torch.where(keep, pos, v).sort(dim=-1).values[:, :width]
    return indices.masked_fill(indices >= v, -1), counts_t


def take(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``x`` (``[B, V, ...]`` -> ``[B, K, ...]``), zeros where ``indices`` is -1."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    out = x[rows, indices.clamp_min(0)]
    pad = (indices < 0).reshape(*indices.shape, *([1] * (x.dim() - 2)))
    return out.masked_fill(pad, 0)


def fastv_select(scores: torch.Tensor, valid: torch.Tensor, spec: FastV, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FastV's kept visual slots from the last prompt token's attention at layer ``spec.layer - 1``.

    Args:
        scores: ``[B, V]`` :func:`~visorlib.visor.reduction.scores.query_attention` of the last token.
        valid: ``[B, V]`` visual-slot validity.
        spec: FastV parameters.
        num_layers: Decoder depth (for the layer check).
    """
    spec.check_layers(num_layers)
    return select_top(scores, valid, keep_counts(spec, valid.sum(1), num_layers))


def pyramiddrop_select(
    scores: torch.Tensor,
    valid: torch.Tensor,
    spec: PyramidDrop,
    num_layers: int,
    stage: int,
    n_visual: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyramidDrop's kept slots at the start of stage ``stage``.

    Args:
        scores: ``[B, V]`` attention of the last instruction token at the stage's first layer, over
            the slots still present.
        valid: ``[B, V]`` validity of those slots.
        spec: PyramidDrop parameters.
        num_layers: Decoder depth.
        stage: Stage index (>= 1; stage 0 keeps everything unless its ratio is below 1).
        n_visual: Each sample's visual tokens entering the LLM (stage counts are shares of it);
            defaults to the valid slots, right for the first prune.
    """
    n_visual = valid.sum(1) if n_visual is None else n_visual
    return select_top(scores, valid, keep_counts(spec, n_visual, num_layers, stage))
