"""Qwen2-VL's vision tower and patch merger, in pure PyTorch.

Reference: Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any
Resolution" (https://arxiv.org/abs/2409.12191). A ViT that takes images at their own resolution:

* **Patches.** The processor cuts every image (or pair of video frames) into 14x14-pixel,
  2-frame patches and flattens each to ``3 * 2 * 14 * 14 = 1176`` values (channel, frame, row,
  column). Hugging Face embeds them with a ``Conv3d`` whose stride equals its kernel, which is a
  linear map of those 1176 values, so :class:`Qwen2VisionTower` uses an ``nn.Linear``.
* **Positions.** No learned table (sizes vary): every block rotates queries and keys by the
  patch's (row, column) in its image, 2-D rotary with half the rotary frequencies for each axis.
* **Attention** stays within one frame: the patches of different images, and of different
  temporal patches of a video, never attend to each other.
* **Merger.** The processor orders patches so that each 2x2 square is consecutive; the
  :class:`PatchMerger` normalises each patch, concatenates every 2x2 square into one vector and maps
  it to the decoder width (``Linear -> GELU -> Linear``). It plays the role of LLaVA's projector and
  is held as ``model.projector``, so parameter and FLOP breakdowns read alike across families.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, VisionConfig
from ...modules.counting import attention_core_flops, linear_flops
from ...modules.layers import RotaryEmbedding, apply_rotary, attend
from ...registry import register_vision_tower

VISION_ROPE_THETA = 10000.0  # fixed in every released Qwen2-VL checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU, which Qwen2-VL's ViT was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) of every patch, in the processor's order: ``[N, 2]``.

    Within a frame, patches come in ``merge x merge`` squares (row-major squares, row-major
    inside a square); frames of a video repeat the same positions.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h, device=grid_thw.device)[:, None].expand(h, w)
        cols = torch.arange(w, device=grid_thw.device)[None, :].expand(h, w)
        squares = [x.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for x in (rows, cols)]
        out.append(torch.stack(squares, dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per attention segment: one segment per frame (temporal patch) of every image/video."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def segment_attention(q, k, v, lengths: list[int], implementation: str) -> torch.Tensor:
    """Attention within consecutive segments of ``q, k, v [H, N, D]``; returns ``[H, N, D]``.

    Segments of equal length are stacked into one batch (a video's frames all are), so a batch of
    frames costs one kernel call and no ``N x N`` mask is ever built.
    """
    out = torch.empty_like(q)
    starts = list(itertools.accumulate([0, *lengths[:-1]]))
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths, strict=True):
        by_length.setdefault(length, []).append(start)
    for length, group in by_length.items():
        index = (torch.tensor(group, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()

        def take(x, length=length, index=index):
            return x[:, index].view(x.shape[0], -1, length, x.shape[-1]).transpose(0, 1)

        result = attend(take(q), take(k), take(v), None, implementation)  # [S, H, length, D]
        out[:, index] = result.transpose(0, 1).reshape(q.shape[0], -1, q.shape[-1])
    return out


class VisionAttention(nn.Module):
    """Multi-head self-attention with fused ``qkv`` and 2-D rotary positions."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, rope, lengths: list[int], implementation: str) -> torch.Tensor:
        cos, sin = rope
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).permute(1, 2, 0, 3)  # 3 x [H, N, D]
        # Rotary in fp32 whatever the weights' dtype, as the reference does.
        q, k = (apply_rotary(t[None].float(), cos[None], sin[None])[0].to(v.dtype) for t in (q, k))
        out = segment_attention(q, k, v, lengths, implementation)
        return self.proj(out.transpose(0, 1).reshape(x.shape[0], -1))


class VisionMLP(nn.Module):
    """``fc2(act(fc1(x)))``; ``act`` is ``cfg.hidden_act`` (``quick_gelu`` in Qwen2-VL)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"vision.hidden_act {cfg.hidden_act!r} is not supported by qwen2_vl "
                              f"(choose from {', '.join(ACTIVATIONS)})")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, rope, lengths: list[int], implementation: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths, implementation)
        return x + self.mlp(self.norm2(x))


class Qwen2VisionTower(nn.Module):
    """Patch embedding and ViT blocks; ``forward`` returns one feature per patch (before merging).

    Args:
        cfg: Tower hyper-parameters (``kind: qwen2_vl``).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_heads
        if head_dim % 4:
            raise ValueError(f"qwen2_vl vision head width {head_dim} must be a multiple of 4 (2-D rotary)")
        self.cfg = cfg
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = nn.Linear(self.patch_dim, cfg.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        # Half of the rotary frequencies turn with the row, the other half with the column.
        self.rotary = RotaryEmbedding(head_dim // 2, VISION_ROPE_THETA)

    def rope(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin [N, head_dim]`` for every patch of ``grid_thw``."""
        positions = patch_positions(grid_thw, self.cfg.spatial_merge_size)
        freqs = positions.float()[..., None] * self.rotary.inv_freq(grid_thw.device)  # [N, 2, head_dim / 4]
        freqs = freqs.flatten(1)  # rows' angles, then columns'
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, implementation: str = "sdpa") -> torch.Tensor:
        """Patch features ``[N, hidden_size]``.

        Args:
            pixel_values: ``[N, in_channels * temporal_patch_size * patch_size**2]`` flattened
                patches of every image (or video) in ``grid_thw``, in order.
            grid_thw: ``[images, 3]`` patches along time, height and width of each one.
            implementation: Attention backend.
        """
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        rope = self.rope(grid_thw.to(x.device))
        lengths = frame_lengths(grid_thw)
        for block in self.blocks:
            x = block(x, rope, lengths, implementation)
        return x


class PatchMerger(nn.Module):
    """``linear_2(gelu(linear_1(concat_2x2(norm(x)))))``: patches -> visual tokens at decoder width.

    Args:
        cfg: The vision tower's configuration (width, merge size, eps).
        out_dim: Decoder width.
    """

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_2 = nn.Linear(self.merged_dim, out_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` patch features -> ``[N / merge**2, out_dim]`` tokens."""
        x = self.norm(patches).view(-1, self.merged_dim)
        return self.linear_2(F.gelu(self.linear_1(x)))


@register_vision_tower("qwen2_vl")
def build_qwen2_vl_tower(cfg: VisionConfig) -> nn.Module:
    """The ``vision.kind: qwen2_vl`` tower."""
    return Qwen2VisionTower(cfg)


def _sequences(patches: int | Sequence[int]) -> list[int]:
    return [patches] if isinstance(patches, int) else [int(n) for n in patches]


def tower_flops(cfg: VisionConfig, patches: int | Sequence[int]) -> float:
    """Qwen2-VL's ViT over ``patches``: one count per attention sequence (frame), or one int.

    Attention stays within a frame, so its cost is a sum of squares of the frames' patch counts;
    the linear layers cost in proportion to all patches together.
    """
    lengths = _sequences(patches)
    total, width = sum(lengths), cfg.hidden_size
    embed = linear_flops(total, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2, width)
    blocks = (
        linear_flops(total, width, 4 * width)  # qkv and output projections
        + 2 * linear_flops(total, width, cfg.intermediate_size)
        + sum(attention_core_flops(n, n, cfg.num_heads, width // cfg.num_heads) for n in lengths)
    )
    return embed + cfg.num_layers * blocks


def merger_flops(cfg: VisionConfig, patches: int | Sequence[int], out_dim: int) -> float:
    """Qwen2-VL's patch merger (the projector): 2x2 patches -> one token of width ``out_dim``."""
    tokens = sum(_sequences(patches)) // cfg.spatial_merge_size**2
    merged = cfg.hidden_size * cfg.spatial_merge_size**2
    return linear_flops(tokens, merged, merged) + linear_flops(tokens, merged, out_dim)
