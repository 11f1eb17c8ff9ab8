"""Pre-LLM token reduction: pure tensor functions on one batch of tiles ``[N, T, D]``.

Each function takes the tiles' features (the vision tower's output, before the projector) and
the scores its rule reads (see :mod:`visorlib.visor.reduction.scores`), and returns a :class:`Reduced`:
the kept or merged features, the index of the tile token each output row comes from, and the
number of rows per tile. VisionZip, VisPruner and pooling keep the same number of rows in every
tile, so a batch stays one dense tensor; HiRED gives tiles different counts and pads.

Output order: rows keep their original (row-major) order within the tile, so the 2-D layout
survives as far as it can and keeping every token returns the input unchanged; a merged VisionZip
token sits where its merge target was (the original appends them after the dominant tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scores import TowerAttentionCapture
from .spec import HiRED, Pooling, Reducer, ReductionSpecError, VisionZip, VisPruner, resolve_keep


@dataclass
class Reduced:
    """Result of a pre-LLM reduction of ``N`` tiles.

    Attributes:
        features: ``[N, K, D]`` kept / merged features (K the largest per-tile count; rows past a
            tile's count are zeros).
        indices: ``[N, K]`` long, the tile token each row comes from (a merged VisionZip token:
            the token it was merged into; padding: -1); None for pooling, whose rows are averages
            of windows.
        counts: ``[N]`` long, rows used per tile.
    """

    features: torch.Tensor
    indices: torch.Tensor | None
    counts: torch.Tensor


def _sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def visionzip(features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, spec: VisionZip) -> Reduced:
    """VisionZip: top tokens by received attention, the rest merged into contextual tokens by key similarity.

    Contextual tokens: of the tokens not kept as dominant (in original order), every
    ``R // C``-th is a merge target; each other token joins the target whose key (mean over heads,
    L2-normalised) is most similar, and a contextual token is ``target + mean(joined tokens)``
    (the original's rule: the target plus the mean, not the mean of all).

    Args:
        features: ``[N, T, D]`` tile features.
        scores: ``[N, T]`` mean attention received (:func:`~visorlib.visor.reduction.scores.received_attention`).
        keys: ``[N, T, dk]`` keys of the scoring layer, averaged over heads.
        spec: The method's parameters.
    """
    n, t, d = features.shape
    kept = resolve_keep(spec.keep, t, "a tile")
    n_dom, n_ctx = spec.split(kept)
    dom = _sorted_topk(scores, n_dom)
    rows = torch.arange(n, device=features.device)[:, None]
    out_feats = [features[rows, dom]]
    out_idx = [dom]
    if n_ctx:
        rest_mask = torch.ones(n, t, dtype=torch.bool, device=features.device)
        rest_mask[rows, dom] = False
        rest = torch.arange(t, device=features.device).expand(n, t)[rest_mask].view(n, t - n_dom)
        r = rest.shape[1]
        is_target = torch.zeros(r, dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, r, max(1, r // n_ctx), device=features.device)[:n_ctx]] = True
        target, merge = rest[:, is_target], rest[:, ~is_target]
        metric = keys / keys.norm(dim=-1, keepdim=True)
        sim = metric[rows, merge] @ metric[rows, target].transpose(1, 2)           # [N, M, C]
        assign = sim.argmax(dim=-1)                                                # [N, M]
        summed = torch.zeros(n, n_ctx, d, dtype=features.dtype, device=features.device)
        summed.scatter_add_(1, assign[..., None].expand(-1, -1, d), features[rows, merge])
        counts = torch.zeros(n, n_ctx, dtype=features.dtype, device=features.device)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=features.dtype))
        out_feats.append(features[rows, target] + summed / counts.clamp_min(1)[..., None])
        out_idx.append(target)
    # Each contextual token takes its target's place, so rows follow the tile's order (the original
    # appends them after the dominant ones); keeping everything then returns the tile unchanged.
    indices, order = torch.cat(out_idx, 1).sort(dim=-1)
    merged = torch.cat(out_feats, 1).gather(1, order[..., None].expand(-1, -1, d))
    counts_out = torch.full((n,), kept, dtype=torch.long, device=features.device)
    return Reduced(merged, indices, counts_out)


def vispruner(features: torch.Tensor, scores: torch.Tensor, spec: VisPruner) -> Reduced:
    """VisPruner: top tokens by received attention, then diverse tokens by removing near-duplicates.

    The tokens left after the important ones, in descending score order, are pruned in rounds
    until ``diverse`` remain: split alternately into A (even positions) and B (odd), score each A
    token by its highest cosine similarity to B (tower features), drop the ``min(step, excess)``
    most similar A tokens, and continue with the rest of A followed by B.

    Args:
        features: ``[N, T, D]`` tile features (also the similarity space, as in the original).
        scores: ``[N, T]`` mean attention received.
        spec: The method's parameters.
    """
    n, t, _ = features.shape
    kept = resolve_keep(spec.keep, t, "a tile")
    n_imp, n_div = spec.split(kept)
    order = scores.argsort(dim=-1, descending=True)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    rows = torch.arange(n, device=features.device)[:, None]
    if n_div == 0:
        residual = residual[:, :0]
    normed = features / features.norm(dim=-1, keepdim=True)
    while True:
        r_len = residual.shape[1]
        step = min(spec.step, r_len - n_div)
        if step <= 0:
            break
        tokens = normed[rows, residual]
        a, b = tokens[:, ::2], tokens[:, 1::2]
        similarity = (a @ b.transpose(1, 2)).max(dim=-1).values                    # [N, |A|]
        distinct = similarity.argsort(dim=-1, descending=True)[:, step:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=1)
    chosen = torch.cat([important, residual], dim=1).sort(dim=-1).values
    counts = torch.full((n,), kept, dtype=torch.long, device=features.device)
    return Reduced(features[rows, chosen], chosen, counts)


def pooled_side(grid: int, keep: int | float) -> int:
    """Side of the square grid :func:`pooling` leaves from a ``grid x grid`` tile.

    A share picks the square count closest to ``keep * grid**2`` (ties to the larger): for the
    27x27 SigLIP grid, 1x -> 27x27, 4x (0.25) -> 13x13 = 169, 8x (0.125) -> 10x10 = 100,
    16x (0.0625) -> 7x7 = 49. A count must be a perfect square ``s*s <= grid**2``.
    """
    if isinstance(keep, float):
        target = keep * grid * grid
        low = max(1, math.isqrt(int(target)))
        return min(grid, min((low, low + 1), key=lambda s: (abs(s * s - target), -s)))
    side = math.isqrt(keep)
    if side * side != keep or side > grid:
        raise ReductionSpecError(f"pooling: 'keep' count {keep} must be a perfect square <= {grid * grid} "
                                 "(the pooled grid is square); use a share for other budgets")
    return side


def pooling(features: torch.Tensor, spec: Pooling) -> Reduced:
    """M3-style average pooling of each tile's square token grid to ``side x side``.

    ``F.adaptive_avg_pool2d``: output cell ``(i, j)`` averages input rows
    ``floor(i*g/s) .. ceil((i+1)*g/s) - 1`` (same for columns), so when ``s`` does not divide
    ``g`` (27 -> 10: windows of 3 or 4 tokens) neighbouring windows share a row or column.
    """
    n, t, d = features.shape
    grid = math.isqrt(t)
    if grid * grid != t:
        raise ReductionSpecError(f"pooling needs a square token grid per tile, got {t} tokens")
    side = pooled_side(grid, spec.keep)
    if side == grid:  # keep-all: return the rows themselves, bit for bit (a pooled copy's layout is not)
        return Reduced(features, None, torch.full((n,), t, dtype=torch.long, device=features.device))
    maps = features.transpose(1, 2).reshape(n, d, grid, grid)
    pooled = F.adaptive_avg_pool2d(maps, side).flatten(2).transpose(1, 2)
    return Reduced(pooled, None, torch.full((n,), side * side, dtype=torch.long, device=features.device))


def apportion(weights: list[float], total: int, cap: int) -> list[int]:
    """Split ``total`` into integers proportional to ``weights``, none above ``cap`` (largest remainder).

    Equal weights when all are zero; what a capped share cannot take goes to the others.
    """
    count = len(weights)
    total = min(total, cap * count)
    if sum(weights) <= 0:
        weights = [1.0] * count
    out = [0] * count
    open_ = [i for i in range(count) if weights[i] > 0]
    left = total
    while left > 0 and open_:
        mass = sum(weights[i] for i in open_)
        exact = {i: left * weights[i] / mass for i in open_}
        give = {i: min(cap - out[i], math.floor(exact[i])) for i in open_}
        rest = left - sum(give.values())
        for i in sorted(open_, key=lambda i: (-(exact[i] - math.floor(exact[i])), i)):
            if rest <= 0:
                break
            if out[i] + give[i] < cap:
                give[i] += 1
                rest -= 1
        for i in open_:
            out[i] += give[i]
        left = total - sum(out)
        open_ = [i for i in open_ if out[i] < cap] if left else []
        if left and not open_:  # only zero-weight tiles have room
            open_ = [i for i in range(count) if out[i] < cap]
            weights = [1.0] * count
    return out


def hired_budgets(budget_scores: torch.Tensor, grid: tuple[int, int], spec: HiRED) -> list[int]:
    """Tokens per tile for one image: ``[base, tile 1, ...]``, from the base tile's attention.

    The base (whole-image) tile gets ``min(int(budget * alpha), T)``; the other tiles share the
    rest in proportion to how many of the base tile's top ``int(T * (1 - alpha))`` tokens (by
    ``budget_scores``) fall on their part of the image. The base grid is mapped onto the
    ``rows x cols`` tile layout proportionally (base row ``i`` covers tile row
    ``i * rows // g``), ignoring the tiles' padding.

    Args:
        budget_scores: ``[n_tiles, T]`` attention scores of the budget layer (only row 0 is read).
        grid: ``(rows, cols)`` of the tiles after the base, ``rows * cols == n_tiles - 1``.
        spec: The method's parameters.
    """
    n_tiles, t = budget_scores.shape
    total = resolve_keep(spec.keep, n_tiles * t, "an image") if isinstance(spec.keep, float) else spec.keep * n_tiles
    if isinstance(spec.keep, int) and spec.keep > t:
        raise ReductionSpecError(f"hired: 'keep' count {spec.keep} per tile is larger than the {t} tokens of a tile")
    if n_tiles == 1:  # no sub-tiles: the whole budget is the base tile's (the original would waste 1 - alpha)
        return [min(total, t)]
    rows, cols = grid
    if rows * cols != n_tiles - 1:
        raise ReductionSpecError(f"hired: grid {rows}x{cols} does not match the {n_tiles - 1} tiles after the base tile")
    side = math.isqrt(t)
    if side * side != t:
        raise ReductionSpecError(f"hired maps the base tile onto the tile layout and needs a square grid, got {t} tokens")
    base = min(int(total * spec.alpha), t)
    top = int(t * (1 - spec.alpha))
    hits = torch.zeros(t, dtype=torch.bool, device=budget_scores.device)
    if top:
        hits[budget_scores[0].topk(top).indices] = True
    pos = torch.arange(t, device=budget_scores.device)
    tile_of = (pos // side) * rows // side * cols + (pos % side) * cols // side
    weights = torch.bincount(tile_of[hits], minlength=rows * cols).tolist()
    return [base] + apportion([float(w) for w in weights], total - base, t)


def hired(
    features: torch.Tensor,
    budget_scores: torch.Tensor,
    select_scores: torch.Tensor,
    tiles_per_image: Sequence[int],
    grids: Sequence[tuple[int, int]],
    spec: HiRED,
) -> Reduced:
    """HiRED on a batch of images' tiles: per-tile budgets (:func:`hired_budgets`), then top tokens per tile.

    Args:
        features: ``[N, T, D]``, the tiles of every image back to back, each image's base tile first
            (LLaVA-OneVision's order).
        budget_scores: ``[N, T]`` attention received at ``spec.budget_layer``.
        select_scores: ``[N, T]`` attention received at ``spec.layer``.
        tiles_per_image: Tiles of each image (sums to N).
        grids: ``(rows, cols)`` of each image's tiles after the base tile.
        spec: The method's parameters.

    Returns:
        Per-tile counts differ; ``features`` / ``indices`` are padded to the largest.
    """
    n, t, d = features.shape
    if sum(tiles_per_image) != n or len(grids) != len(tiles_per_image):
        raise ReductionSpecError(f"hired: tiles_per_image {list(tiles_per_image)} and {len(grids)} grids do not "
                                 f"describe {n} tiles")
    counts: list[int] = []
    start = 0
    for tiles, grid in zip(tiles_per_image, grids, strict=True):
        counts.extend(hired_budgets(budget_scores[start:start + tiles], grid, spec))
        start += tiles
    count_t = torch.tensor(counts, dtype=torch.long, device=features.device)
    order = select_scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(t, device=features.device).expand(n, t))
    keep_mask = rank < count_t[:, None]
    width = max(counts) if counts else 0
    pos = torch.arange(t, device=features.device).expand(n, t)
    indices = torch.where(keep_mask, pos, t).sort(dim=-1).values[:, :width]
    valid = indices < t
    indices = indices.masked_fill(~valid, -1)
    rows = torch.arange(n, device=features.device)[:, None]
    gathered = features[rows, indices.clamp_min(0)] * valid[..., None]
    return Reduced(gathered, indices, count_t)


def apply_pre_llm(
    spec: Reducer,
    features: torch.Tensor,
    capture: TowerAttentionCapture | PackedCapture | None = None,
    tiles_per_image: Sequence[int] | None = None,
    grids: Sequence[tuple[int, int]] | None = None,
) -> Reduced:
    """Run a pre-LLM reducer, reading its scores from a :class:`~visorlib.visor.reduction.scores.TowerAttentionCapture`.

    Args:
        spec: A pre-LLM reducer.
        features: ``[N, T, D]`` tile features of the forward the capture recorded.
        capture: The capture (needed by the methods that read tower attention).
        tiles_per_image: Tiles of each image, for HiRED (default: every tile its own image).
        grids: ``(rows, cols)`` of each image's tiles after the base tile, for HiRED.
    """
    if isinstance(spec, Pooling):
        return pooling(features, spec)
    if capture is None:
        raise ReductionSpecError(f"{spec.name} scores tokens by the vision tower's attention: run the tower "
                                 "inside a TowerAttentionCapture")
    if isinstance(spec, VisionZip):
        return visionzip(features, capture.received(spec.layer), capture.keys(spec.layer), spec)
    if isinstance(spec, VisPruner):
        return vispruner(features, capture.received(spec.layer), spec)
    if isinstance(spec, HiRED):
        if tiles_per_image is None:
            tiles_per_image, grids = [1] * features.shape[0], [(0, 0)] * features.shape[0]
        return hired(features, capture.received(spec.budget_layer), capture.received(spec.layer),
                     tiles_per_image, grids, spec)
    raise ReductionSpecError(f"{spec.name} is not a pre-LLM method")


def tower_layers(spec: Reducer) -> tuple[int, ...]:
    """Tower blocks whose q/k ``spec`` reads (empty for methods that need no tower attention)."""
    if isinstance(spec, HiRED):
        return (spec.budget_layer, spec.layer)
    if isinstance(spec, (VisionZip, VisPruner)):
        return (spec.layer,)
    return ()


class PackedCapture:
    """A capture's scores and keys mapped onto VISOR-TR's packed grid, so a reducer can select packed tokens.

    VISOR-TR packing (:class:`~visorlib.visor.token_packing.TokenPacker`) resizes each tile's
    ``g x g`` grid bilinearly to ``2s x 2s`` and folds 2x2 cells into one token. The tower's
    scores and keys live on the ``g x g`` grid; they are mapped the same way (the same bilinear
    resize, then the mean of each 2x2 cell), so a packed token's score is the mean score of the
    area it covers. This is an approximation: no attention was computed between packed tokens.

    Args:
        capture: The :class:`TowerAttentionCapture` of the tower's forward.
        side: Tokens per side of a packed tile.
    """

    def __init__(self, capture: TowerAttentionCapture, side: int):
        self.capture = capture
        self.side = side

    def _map(self, values: torch.Tensor) -> torch.Tensor:
        n, t, c = values.shape
        grid = math.isqrt(t)
        maps = values.transpose(1, 2).reshape(n, c, grid, grid).float()
        maps = F.interpolate(maps, size=(2 * self.side, 2 * self.side), mode="bilinear", align_corners=False)
        return F.avg_pool2d(maps, 2).flatten(2).transpose(1, 2).to(values.dtype)

    def received(self, layer: int) -> torch.Tensor:
        """``[N, side**2]`` mean received attention over each packed token's area."""
        return self._map(self.capture.received(layer)[..., None])[..., 0]

    def keys(self, layer: int) -> torch.Tensor:
        """``[N, side**2, d]`` keys (mean over heads) averaged over each packed token's area."""
        return self._map(self.capture.keys(layer))


def encode_and_reduce(
    tower: torch.nn.Module,
    pixel_values: torch.Tensor,
    spec: Reducer,
    tiles_per_image: Sequence[int] | None = None,
    grids: Sequence[tuple[int, int]] | None = None,
    packer: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, Reduced]:
    """Run ``tower`` on ``pixel_values`` (its own SDPA attention untouched) and reduce its tiles with ``spec``.

    Gradients flow through the features as usual (a recipe can train the projector or the tower
    under a reducer); the scores are computed from detached q/k and carry none.

    Args:
        tower: The vision tower.
        pixel_values: ``[N, 3, S, S]`` tiles.
        spec: A pre-LLM reducer.
        tiles_per_image: Tiles of each image, for HiRED (see :func:`apply_pre_llm`).
        grids: ``(rows, cols)`` of each image's tiles after the base tile, for HiRED.
        packer: VISOR-TR's token packer, when the model packs: the reducer then selects among the
            packed tokens, with the tower's scores mapped onto the packed grid (:class:`PackedCapture`).

    Returns:
        ``(features, reduced)``: the tower's (packed) ``[N, T, D]`` output and :func:`apply_pre_llm`'s result.

    Raises:
        ReductionSpecError: ``spec`` reads tower attention and ``tower`` does not expose it.
    """
    if not spec.needs_tower_attention:
        features = tower(pixel_values)
        features = features if packer is None else packer(features)
        return features, apply_pre_llm(spec, features, None, tiles_per_image, grids)
    with TowerAttentionCapture(tower, tower_layers(spec)) as capture:
        features = tower(pixel_values)
    if packer is not None:
        features, capture = packer(features), PackedCapture(capture, packer.side)
    return features, apply_pre_llm(spec, features, capture, tiles_per_image, grids)
