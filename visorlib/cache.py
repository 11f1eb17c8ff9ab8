"""Key/value cache for incremental decoding.

Each decoder layer owns one slot. Keys and values are stored in preallocated buffers that grow
geometrically, so a decode step writes one column instead of re-concatenating the whole history
(which would make generation quadratic in memory traffic).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value store.

    Args:
        num_layers: Number of decoder layers that will write to the cache.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def length(self, layer: int = 0) -> int:
        """Tokens cached so far in ``layer``."""
        return self.lengths[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v [B, H, L, D]`` to ``layer`` and return everything cached for it."""
        start, new = self.lengths[layer], k.shape[2]
        buf_k = self.keys[layer]
        if buf_k is None or start + new > buf_k.shape[2]:
            capacity = max(start + new, 2 * (buf_k.shape[2] if buf_k is not None else 0), 16)
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if buf_k is not None:
                grown_k[:, :, :start] = buf_k[:, :, :start]
                grown_v[:, :, :start] = self.values[layer][:, :, :start]
            self.keys[layer], self.values[layer] = grown_k, grown_v
        self.keys[layer][:, :, start : start + new] = k
        self.values[layer][:, :, start : start + new] = v
        self.lengths[layer] = start + new
        end = start + new
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        """Bytes of keys and values actually cached (not the spare capacity)."""
        total = 0
        for k, n in zip(self.keys, self.lengths, strict=False):
            if k is not None:
                total += 2 * k[:, :, :n].numel() * k.element_size()
        return total
