"""LLaVA-OneVision "anyres" geometry, shared by the image processor and the model.

A high-resolution image is resized (aspect kept) and centre-padded onto the best grid of tiles
among the *pinpoint* resolutions, cut into tiles, and a downsized copy of the whole image (the
*base* tile) goes first. After the vision tower, the tile features are stitched back into one
feature grid, the rows/columns that only saw padding are cut away ("unpad"), the grid is shrunk
bilinearly if it holds more than ``anyres_max_N`` tiles' worth of tokens, and a learned
``image_newline`` token ends every row.

The processor must know how many placeholder tokens to write and the model must produce exactly
that many features, so both call the functions here; no other file re-derives this arithmetic.
Reference: LLaVA-OneVision (https://arxiv.org/abs/2408.03326) and LLaVA-NeXT's ``anyres`` code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def select_best_resolution(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps the most image pixels, then wastes the fewest.

    Args:
        image_size: Original ``(height, width)``.
        pinpoints: Candidate ``(height, width)`` resolutions.
    """
    height, width = int(image_size[0]), int(image_size[1])
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_h), int(cand_w)), effective, wasted
    if best is None:
        raise ValueError(f"no pinpoint resolution fits an image of size {tuple(image_size)}")
    return best


def tile_grid(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """``(rows, cols)`` of tiles the image is cut into (the base tile not included)."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return math.ceil(best_h / tile), math.ceil(best_w / tile)


def num_tiles(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """Tiles fed to the vision tower for one image: the grid plus the base tile."""
    rows, cols = tile_grid(image_size, pinpoints, tile)
    return rows * cols + 1


def unpadded_crop(image_size: Sequence[int], grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Feature-grid window ``(top, bottom, left, right)`` that covers the image, not its padding.

    Args:
        image_size: Original ``(height, width)``.
        grid_h: Height of the stitched feature grid (``rows * tokens_per_side``).
        grid_w: Width of the stitched feature grid.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def downscaled_size(height: int, width: int, tokens_per_side: int, max_tiles: int) -> tuple[int, int] | None:
    """Target ``(h, w)`` when an unpadded grid holds > ``max_tiles`` tiles' worth of tokens, else None.

    The 1.1 slack is LLaVA-OneVision's: grids at most ~21 % over budget are kept as they are.
    """
    ratio = math.sqrt(height * width / (max_tiles * tokens_per_side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return None


def image_feature_shape(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    tokens_per_side: int,
    max_tiles: int,
) -> tuple[int, int]:
    """``(height, width)`` of an image's final feature grid (after unpad and downscale)."""
    rows, cols = tile_grid(image_size, pinpoints, tile)
    top, bottom, left, right = unpadded_crop(image_size, rows * tokens_per_side, cols * tokens_per_side)
    height, width = bottom - top, right - left
    return downscaled_size(height, width, tokens_per_side, max_tiles) or (height, width)


def num_image_tokens(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    tokens_per_side: int,
    max_tiles: int,
    newline: bool = True,
    tiled: bool = True,
) -> int:
    """Visual tokens one image contributes to the language model.

    Args:
        image_size: Original ``(height, width)``.
        pinpoints: Candidate tiled resolutions.
        tile: Tile side in pixels.
        tokens_per_side: Feature-grid side of one tile (27 for SigLIP-so400m/14 at 384 px).
        max_tiles: N of ``anyres_max_N``.
        newline: Whether an ``image_newline`` token ends every row (and the lone base tile).
        tiled: False for images of a multi-image sample, which keep the base tile only.
    """
    base = tokens_per_side**2
    if not tiled:
        return base + int(newline)
    height, width = image_feature_shape(image_size, pinpoints, tile, tokens_per_side, max_tiles)
    return base + height * width + (height if newline else 0)


def video_tokens_per_frame(tokens_per_side: int) -> int:
    """Tokens of one video frame after LLaVA-OneVision's 2x bilinear pooling (27x27 -> 14x14)."""
    return math.ceil(tokens_per_side / 2) ** 2


def num_video_tokens(num_frames: int, tokens_per_side: int, newline: bool = True) -> int:
    """Tokens of one video: pooled frames, then a single ``image_newline``."""
    return num_frames * video_tokens_per_frame(tokens_per_side) + int(newline)
