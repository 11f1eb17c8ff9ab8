"""VISOR-TR token packing (paper §4.4, appendix I): fewer visual tokens, no new parameters.

Each tile's patch features are put back on their 2-D grid, resized bilinearly to ``2p x 2p`` and
folded 2x2 into channels (space-to-depth), leaving ``p x p`` tokens of 4x the width, with
``p = round(grid / sqrt(ratio))``. Any ratio >= 1 works, powers of two or not (27x27 -> 19x19 for
2x, 16x16 for 3x, 14x14 for 4x).

Where the paper is silent: the 4x wider tokens reach the language model through the projector,
whose first linear layer is widened from C to 4C inputs. :func:`widen_projector` initialises it
as four copies of the pretrained weight divided by 4, so a freshly packed model sees exactly the
2x2 *average* of the resized grid through the pretrained projector, and training can then learn to
use the finer detail kept in the channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import packed_grid_size


class TokenPacker(nn.Module):
    """Parameter-free ``[N, grid*grid, C] -> [N, side*side, 4C]`` packing of tile features.

    Args:
        grid: Tokens per side of a tile from the vision tower (27 for SigLIP/14 at 384 px).
        ratio: Approximate reduction of the number of tokens (>= 1).
    """

    def __init__(self, grid: int, ratio: float):
        super().__init__()
        self.grid = grid
        self.ratio = ratio
        self.side = packed_grid_size(grid, ratio)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[1] != self.grid**2:
            raise ValueError(f"expected {self.grid ** 2} tokens per tile, got {tiles.shape[1]}")
        maps = rearrange(tiles, "n (h w) c -> n c h w", h=self.grid)
        maps = F.interpolate(maps, size=(2 * self.side, 2 * self.side), mode="bilinear", align_corners=False)
        return rearrange(maps, "n c (h dh) (w dw) -> n (h w) (dh dw c)", dh=2, dw=2)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, ratio={self.ratio}, side={self.side}"


@torch.no_grad()
def widen_projector(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` taking 4x the inputs, equal to ``linear`` applied to the 2x2 mean."""
    wide = nn.Linear(4 * linear.in_features, linear.out_features, bias=linear.bias is not None)
    wide = wide.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.weight.is_meta:
        return wide
    wide.weight.copy_(linear.weight.repeat(1, 4) / 4)
    if linear.bias is not None:
        wide.bias.copy_(linear.bias)
    return wide
