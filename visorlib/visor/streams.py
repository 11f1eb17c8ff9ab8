"""The two token streams of a VISOR layer: gather and scatter of visual and text tokens.

A VISOR decoder keeps the visual tokens out of most layers. The executor therefore moves each
sample's tokens between the original sequence ``[B, L, D]`` and two left-padded streams (text
``[B, N_t, D]``, visual ``[B, N_v, D]``, tokens in their original order). Samples of one batch
have different token counts, so every stream carries a validity mask, and padded slots point at
a scratch position ``L`` that reads zeros and swallows writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compact(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of ``select [B, L]``, left-padded to the longest row.

    Returns:
        ``(index [B, N], valid [B, N])``; padded slots point at position ``L`` (a scratch slot).
    """
    length = select.shape[1]
    positions = torch.arange(length, device=select.device).expand_as(select)
    keyed = torch.where(select, positions, torch.full_like(positions, -1))
    count = int(select.sum(1).max()) if select.numel() else 0
    ordered = keyed.sort(dim=1).values[:, length - count :]
    valid = ordered >= 0
    return torch.where(valid, ordered, torch.full_like(ordered, length)), valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x [B, L, ...]``; index ``L`` reads zeros."""
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return padded.gather(1, expanded)


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rotary positions ``[B, L]`` or M-RoPE's ``[3, B, L]`` at token ``index [B, N]`` (along ``L``)."""
    if positions.dim() == 2:
        return gather_tokens(positions, index)
    return gather_tokens(positions.permute(1, 2, 0), index).permute(2, 0, 1)


def scatter_tokens(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``target[b, index[b]] = values[b]`` out of place; writes to index ``L`` are dropped."""
    padded = torch.cat([target, target.new_zeros(target.shape[0], 1, *target.shape[2:])], dim=1)
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return padded.scatter(1, expanded, values)[:, :-1]


@dataclass
class Layout:
    """Where each sample's text and visual tokens sit in the original sequence."""

    text_index: torch.Tensor
    text_valid: torch.Tensor
    visual_index: torch.Tensor
    visual_valid: torch.Tensor

    @classmethod
    def build(cls, visual_mask: torch.Tensor, attention_mask: torch.Tensor) -> Layout:
        real = attention_mask.bool()
        text_index, text_valid = compact(real & ~visual_mask)
        visual_index, visual_valid = compact(real & visual_mask)
        return cls(text_index, text_valid, visual_index, visual_valid)

    def select(self, rows: torch.Tensor) -> Layout:
        return Layout(*(t[rows] for t in (self.text_index, self.text_valid, self.visual_index, self.visual_valid)))
