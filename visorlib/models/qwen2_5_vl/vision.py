"""Qwen2.5-VL's vision tower and merger: Qwen2-VL's ViT with window attention, RMSNorm and a gated MLP.

Reference: Bai et al., "Qwen2.5-VL Technical Report" (https://arxiv.org/abs/2502.13923), section
2.1.1. The patches, the 2-D rotary positions, the fused ``qkv`` attention and the order the
processor writes patches in are Qwen2-VL's (imported from :mod:`visorlib.models.qwen2_vl.vision`,
not copied). What changes:

* **Window attention.** Most blocks attend only within square windows of ``window_size`` pixels
  (112: 8x8 patches, 4x4 merged tokens); the blocks in ``fullatt_block_indexes`` (``7, 15, 23, 31``)
  attend over the whole frame, so the cost grows linearly with the image except in four blocks.
  Windows tile each frame's merged-token grid from the top left; the last row and column of
  windows may be smaller.
* **Window order.** :func:`window_order` lists the merged tokens window by window (row-major
  windows, row-major inside a window) with plain tensor ops: pad the grid to whole windows with
  -1, fold it into windows, drop the padding. The tower permutes its patches into that order
  once (a merged token's 2x2 patches stay together, so the merger still sees its squares), every
  window is then a run of consecutive patches, and the windowed and the full blocks both attend
  within runs (:func:`~visorlib.models.qwen2_vl.vision.segment_attention`, SDPA or eager; no
  mask is built). A frame stays contiguous under the permutation, so full attention is still
  "one run per frame". The reverse permutation restores the processor's order at the end.
* **RMSNorm** (eps 1e-6) instead of LayerNorm, in the blocks and in the merger, and a **gated
  MLP** ``down(silu(gate(x)) * up(x))`` with biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, VisionConfig
from ...modules.counting import attention_core_flops, linear_flops
from ...modules.layers import RMSNorm, RotaryEmbedding
from ...registry import register_vision_tower
from ..qwen2_vl.vision import VISION_ROPE_THETA, Qwen2VisionTower, VisionAttention, frame_lengths

NORM_EPS = 1e-6  # fixed in transformers' Qwen2.5-VL tower (not read from the config)


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Merged tokens in window order, and the patches per window.

    Args:
        grid_thw: ``[images, 3]`` patch grids.
        merge: Patches per side of a merged token (2).
        window: Merged tokens per side of a window (``window_size // patch_size // merge``).

    Returns:
        ``(order, lengths)``: ``order[i]`` is the merged token (counted over all images, in the
        processor's order) that comes ``i``-th; ``lengths`` the patches of each window in that
        order (empty windows left out).
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // merge, w // merge
        index = torch.arange(t * h * w, device=grid_thw.device).view(t, h, w)
        pad_h, pad_w = -h % window, -w % window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        rows, cols = (h + pad_h) // window, (w + pad_w) // window
        windows = padded.view(t, rows, window, cols, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        real = windows >= 0
        order.append(windows[real] + offset)
        lengths += [n * merge * merge for n in real.sum(-1).tolist() if n]
        offset += t * h * w
    return torch.cat(order), lengths


def patch_order(token_order: torch.Tensor, merge: int) -> torch.Tensor:
    """The patch permutation of a merged-token permutation (each token's ``merge**2`` patches stay together)."""
    unit = merge * merge
    return (token_order[:, None] * unit + torch.arange(unit, device=token_order.device)).flatten()


class GatedMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, with biases (the tower's MLP)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ConfigError(f"vision.hidden_act {cfg.hidden_act!r} is not supported by qwen2_5_vl (it uses 'silu')")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class WindowBlock(nn.Module):
    """Pre-RMSNorm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, attention within runs."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, rope, lengths: list[int], implementation: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths, implementation)
        return x + self.mlp(self.norm2(x))


class Qwen25VisionTower(nn.Module):
    """Patch embedding and windowed ViT blocks; one feature per patch, in the processor's order.

    The patch embedding (a linear map of the flattened patch) and the 2-D rotary tables are
    Qwen2-VL's (:meth:`rope` is :meth:`Qwen2VisionTower.rope`); the blocks are :class:`WindowBlock`.

    Args:
        cfg: Tower hyper-parameters (``kind: qwen2_5_vl``).
    """

    rope = Qwen2VisionTower.rope

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_heads
        unit = cfg.patch_size * cfg.spatial_merge_size
        if head_dim % 4:
            raise ConfigError(f"qwen2_5_vl vision head width {head_dim} must be a multiple of 4 (2-D rotary)")
        if cfg.window_size < unit or cfg.window_size % unit:
            raise ConfigError(f"vision.window_size {cfg.window_size} must be a positive multiple of patch_size * "
                              f"spatial_merge_size = {unit} for qwen2_5_vl")
        self.cfg = cfg
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = nn.Linear(self.patch_dim, cfg.hidden_size, bias=False)
        self.blocks = nn.ModuleList(WindowBlock(cfg) for _ in range(cfg.num_layers))
        self.rotary = RotaryEmbedding(head_dim // 2, VISION_ROPE_THETA)
        self.window = cfg.window_size // unit  # merged tokens per window side
        self.full_attention = frozenset(cfg.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, implementation: str = "sdpa") -> torch.Tensor:
        """Patch features ``[N, hidden_size]`` (see :meth:`Qwen2VisionTower.forward`)."""
        merge = self.cfg.spatial_merge_size
        grid_thw = grid_thw.to(self.patch_embed.weight.device)
        tokens, windows = window_order(grid_thw, merge, self.window)
        order = patch_order(tokens, merge)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))[order]
        cos, sin = self.rope(grid_thw)
        rope = cos[order], sin[order]
        frames = frame_lengths(grid_thw)
        for index, block in enumerate(self.blocks):
            x = block(x, rope, frames if index in self.full_attention else windows, implementation)
        return x[torch.argsort(order)]


class RMSPatchMerger(nn.Module):
    """``linear_2(gelu(linear_1(concat_2x2(rmsnorm(x)))))``: Qwen2-VL's merger with an RMSNorm.

    Args:
        cfg: The tower's configuration (width, merge size).
        out_dim: Decoder width (transformers' ``out_hidden_size``).
    """

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.linear_1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_2 = nn.Linear(self.merged_dim, out_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` patch features -> ``[N / merge**2, out_dim]`` tokens."""
        return self.linear_2(F.gelu(self.linear_1(self.norm(patches).view(-1, self.merged_dim))))


@register_vision_tower("qwen2_5_vl")
def build_qwen2_5_vl_tower(cfg: VisionConfig) -> nn.Module:
    """The ``vision.kind: qwen2_5_vl`` tower."""
    return Qwen25VisionTower(cfg)


def _grids(media: object) -> list[tuple[int, int, int]] | None:
    """``media`` as ``(t, h, w)`` patch grids when it is a list of them, else None."""
    if isinstance(media, torch.Tensor):
        media = media.tolist()
    if isinstance(media, Sequence) and media and all(isinstance(g, Sequence) and len(g) == 3 for g in media):
        return [tuple(int(n) for n in g) for g in media]
    return None


def attention_runs(cfg: VisionConfig, media: object) -> tuple[list[int], list[int]]:
    """``(frames, windows)``: the patches of every full-attention run and of every window.

    ``media`` is what the FLOP model calls ``tiles`` for this family: a list of ``(t, h, w)``
    patch grids (exact), or, like Qwen2-VL's, patches per frame or one int (then every window
    is taken as full, ``(window_size / patch_size)**2`` patches, and the last one as the rest).
    """
    grids = _grids(media)
    if grids is not None:
        merge = cfg.spatial_merge_size
        grid = torch.tensor(grids)
        return frame_lengths(grid), window_order(grid, merge, cfg.window_size // cfg.patch_size // merge)[1]
    frames = [media] if isinstance(media, int) else [int(n) for n in media]
    full = (cfg.window_size // cfg.patch_size) ** 2
    windows = [size for n in frames for size in [full] * (n // full) + ([n % full] if n % full else [])]
    return frames, windows


def tower_flops(cfg: VisionConfig, media: object) -> float:
    """Qwen2.5-VL's tower: linear layers over all patches, attention per window or per frame.

    Args:
        cfg: The tower.
        media: ``(t, h, w)`` grids, patches per frame, or one int (see :func:`attention_runs`).
    """
    frames, windows = attention_runs(cfg, media)
    total, width, heads = sum(frames), cfg.hidden_size, cfg.num_heads
    embed = linear_flops(total, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2, width)
    linear = linear_flops(total, width, 4 * width) + 3 * linear_flops(total, width, cfg.intermediate_size)
    full = cfg.fullatt_block_indexes
    attention = (len(full) * sum(attention_core_flops(n, n, heads, width // heads) for n in frames)
                 + (cfg.num_layers - len(full)) * sum(attention_core_flops(n, n, heads, width // heads) for n in windows))
    return embed + cfg.num_layers * linear + attention


def merger_flops(cfg: VisionConfig, media: object, out_dim: int) -> float:
    """The merger (the projector): 2x2 patches -> one token of width ``out_dim``."""
    tokens = sum(attention_runs(cfg, media)[0]) // cfg.spatial_merge_size**2
    merged = cfg.hidden_size * cfg.spatial_merge_size**2
    return linear_flops(tokens, merged, merged) + linear_flops(tokens, merged, out_dim)
