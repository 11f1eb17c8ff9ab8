"""Transformer primitives shared by every decoder and VISOR block.

RMSNorm, rotary position embeddings and one attention entry point (:func:`attend`) that
dispatches to PyTorch SDPA (default), an eager reference path, or flash-attn when it is installed
and the inputs are on a GPU. Numerics deliberately follow Hugging Face's Qwen2 code (fp32 norm
statistics, fp32 rotary tables, fp32 softmax on the eager path) so that parity holds to ~1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # flash-attn is an optional GPU extra; SDPA is always available.
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash")


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm with statistics in fp32 (as Qwen2 does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (cos, sin) for integer positions, 1-D or multimodal.

    With ``mrope_section`` (Qwen2-VL's M-RoPE, https://arxiv.org/abs/2409.12191) a token has three
    positions (temporal, height, width): the ``head_dim / 2`` frequencies are cut into three runs of
    ``mrope_section`` lengths, and run ``i`` takes its angles from axis ``i``. Text tokens carry the
    same position on all three axes, which makes M-RoPE equal to plain RoPE on them.

    Args:
        head_dim: Width of one attention head (the rotated dimension).
        theta: Base frequency.
        mrope_section: Frequencies per axis (temporal, height, width); they must sum to
            ``head_dim // 2``. None for plain 1-D rotary positions.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        if mrope_section is not None and (len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2):
            raise ValueError(f"mrope_section {mrope_section} must be 3 numbers summing to head_dim / 2 = {head_dim // 2}")
        self.mrope_section = None if mrope_section is None else list(mrope_section)
        # Not a buffer: it is a pure function of the config, so it is never saved or loaded and
        # stays correct when the module was built on the meta device.
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            self._inv_freq = 1.0 / (self.theta**exponent)
        return self._inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``position_ids`` ``[B, L]`` (or ``[3, B, L]`` under M-RoPE) -> ``cos, sin [B, L, head_dim]``."""
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)
        if position_ids.dim() == 3:
            if self.mrope_section is None or position_ids.shape[0] != 3:
                raise ValueError(f"position_ids of shape {list(position_ids.shape)} need M-RoPE ([3, B, L] and an "
                                 "mrope_section in the decoder config)")
            runs = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([run[axis] for axis, run in enumerate(runs)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, L, D]`` by tables ``[B, L, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    implementation: str = "sdpa",
    is_causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: ``[B, Hq, Lq, D]`` queries.
        k: ``[B, Hkv, Lk, D]`` keys; ``Hq`` must be a multiple of ``Hkv``.
        v: ``[B, Hkv, Lk, D]`` values.
        mask: Boolean ``[B, 1, Lq, Lk]`` (True = may attend) or None.
        implementation: ``"sdpa"``, ``"eager"`` or ``"flash"``.
        is_causal: Use a plain causal mask (only when ``mask`` is None and ``Lq == Lk``).

    Returns:
        ``[B, Hq, Lq, D]``.
    """
    groups = q.shape[1] // k.shape[1]
    if implementation == "flash" and _flash_usable(q, mask):
        # flash-attn wants [B, L, H, D] and handles GQA natively.
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)
        return out.transpose(1, 2)
    if implementation == "eager":
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if is_causal and mask is None:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {ATTN_IMPLEMENTATIONS}")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, enable_gqa=groups > 1
    )


def _flash_usable(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return _flash_attn_func is not None and q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16)


def causal_padding_mask(
    attention_mask: torch.Tensor, query_length: int, past_length: int = 0
) -> torch.Tensor:
    """Boolean ``[B, 1, Lq, Lk]`` mask: causal, and blind to padded keys.

    Args:
        attention_mask: ``[B, Lk]`` with 1 for real tokens and 0 for padding, ``Lk = past + Lq``.
        query_length: Number of new (query) tokens; they sit at the end of the key sequence.
        past_length: Number of cached tokens before the queries.

    A padded query would otherwise see no key at all, and a fully masked softmax row is NaN, which
    then leaks through the values of later layers; so every query may always see itself.
    """
    total = attention_mask.shape[1]
    device = attention_mask.device
    q_pos = torch.arange(past_length, past_length + query_length, device=device)
    k_pos = torch.arange(total, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of every row is position 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)
