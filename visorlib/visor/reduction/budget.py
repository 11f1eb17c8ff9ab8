"""Token accounting of reducers, for FLOPs: visual tokens per tile and per decoder layer.

Counts here are exact, not estimates: every method keeps a number of tokens fixed by its spec
and the input sizes (HiRED's per-tile split depends on the image, its per-image total does not),
so :mod:`visorlib.flops` can charge each decoder layer for the visual tokens it really sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .in_llm import keep_counts, prune_points
from .pre_llm import pooled_side
from .spec import IN_LLM, PRE_LLM, HiRED, Pooling, Reducer, ReductionSpecError, parse_reduction, resolve_keep


def pre_llm_tokens(spec: Reducer, tile_tokens: int, n_tiles: int = 1) -> int:
    """Visual tokens one image of ``n_tiles`` tiles of ``tile_tokens`` tokens keeps under a pre-LLM reducer."""
    if spec.where != PRE_LLM:
        raise ReductionSpecError(f"{spec.name} is not a pre-LLM method")
    if isinstance(spec, Pooling):
        grid = math.isqrt(tile_tokens)
        return n_tiles * pooled_side(grid, spec.keep) ** 2
    if isinstance(spec, HiRED):
        if isinstance(spec.keep, int):
            if spec.keep > tile_tokens:
                raise ReductionSpecError(f"hired: 'keep' count {spec.keep} per tile is larger than the "
                                         f"{tile_tokens} tokens of a tile")
            total = spec.keep * n_tiles
        else:
            total = resolve_keep(spec.keep, n_tiles * tile_tokens, "an image")
        return min(total, tile_tokens) if n_tiles == 1 else total
    return n_tiles * resolve_keep(spec.keep, tile_tokens, "a tile")


def drops_nothing(spec: Reducer, tile_tokens: int) -> bool:
    """Whether a pre-LLM reducer keeps every token of every tile: ``keep: 1.0``, or a per-tile count
    equal to the tile's ``tile_tokens``.

    Such a reducer is no reduction at all, and the models, processors and FLOP counts treat it
    as none: the image keeps its unreduced layout (LLaVA-OneVision's unpadded grid with a newline
    per row), so ``keep=1.0`` reproduces the unreduced model's logits and an accuracy-vs-keep
    curve starts at the unreduced accuracy. The reduced layout (tiles' kept tokens in tile order,
    one newline) would hold the same features in another order, without the row newlines. The
    rule reads the spec, not the image: a share below 1.0 that happens to round to every token
    still takes the reduced layout.
    """
    if spec.where != PRE_LLM:
        return False
    keep = spec.keep
    return keep == tile_tokens if isinstance(keep, int) else keep >= 1.0


def tokens_per_layer(
    spec: Any,
    n_visual: int,
    num_layers: int,
    tiles: Sequence[int] | None = None,
    tile_tokens: int | None = None,
) -> list[int]:
    """Visual tokens one sample's decoder layers see under ``spec``: a list of ``num_layers`` counts.

    Args:
        spec: A token-reduction spec (dict, list, reducer) or None.
        n_visual: Visual tokens the language model would get without reduction.
        num_layers: Decoder depth.
        tiles: With a pre-LLM reducer, the number of tiles of each image of the sample; their
            ``tiles * tile_tokens`` tokens are reduced and the remaining ``n_visual - that`` (e.g.
            LLaVA-OneVision's row-newline tokens) pass through unchanged.
        tile_tokens: Tokens per tile (729 for SigLIP/14 at 384 px).

    Raises:
        ReductionSpecError: A bad spec, a pre-LLM reducer without ``tiles``, or counts that do not add up.
    """
    reducers = parse_reduction(spec)
    count = n_visual
    for reducer in (r for r in reducers if r.where == PRE_LLM):
        if tiles is None or tile_tokens is None:
            raise ReductionSpecError(f"{reducer.name} reduces each tile: pass tiles= and tile_tokens=")
        covered = sum(tiles) * tile_tokens
        if covered > n_visual:
            raise ReductionSpecError(f"{sum(tiles)} tiles of {tile_tokens} tokens are more than the {n_visual} "
                                     "visual tokens")
        count = n_visual - covered + sum(pre_llm_tokens(reducer, tile_tokens, n) for n in tiles)
    per_layer = [count] * num_layers
    for reducer in (r for r in reducers if r.where == IN_LLM):
        for point in prune_points(reducer, num_layers):
            kept = keep_counts(reducer, [count], num_layers, point.stage)[0]
            for layer in range(point.layer, num_layers):
                per_layer[layer] = min(per_layer[layer], kept)
    return per_layer


def tokens_per_layer_batch(
    spec: Any,
    n_visual: Sequence[int],
    num_layers: int,
    tiles: Sequence[Sequence[int]] | None = None,
    tile_tokens: int | None = None,
) -> list[list[int]]:
    """:func:`tokens_per_layer` for each sample of a batch (``tiles[b]``: that sample's images)."""
    return [
        tokens_per_layer(spec, n, num_layers, None if tiles is None else tiles[b], tile_tokens)
        for b, n in enumerate(n_visual)
    ]
