"""Key/value cache for incremental decoding.

Each decoder layer owns one slot. Under a VISOR plan layers cache different token sets (text
only, or visual + text for an executed self-attention layer), so every slot keeps its own
key-validity mask; cross-attention layers also keep the visual keys/values they projected once at
prefill, reused by every decode step. Keys and values are stored in preallocated buffers that grow
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
        self.key_masks: list[torch.Tensor | None] = [None] * num_layers
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.seen = 0  # tokens of the original sequence processed so far
        self.cross_projections = 0  # how many times cross-attention K/V were computed (for tests)
        # ``[B, 1]`` offset from a token's count of real tokens to its rotary position, fixed at
        # prefill by a family whose positions are not simply counted (Qwen2-VL's M-RoPE: an image
        # spans fewer positions than tokens); decode steps add it. None: positions are counts.
        self.position_offset: torch.Tensor | None = None

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

    def write_rows(self, layer: int, rows: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   batch: int, length: int) -> None:
        """Prefill of a slot shared by two groups of samples: write ``k, v [R, H, N, d]`` of
        samples ``rows`` at sequence positions ``index [R, N]`` of a ``[batch, H, length, d]`` slot.

        Positions equal to ``length`` (padded stream slots) land in one spare column past the end,
        which the first decode step overwrites. Unwritten positions stay zero; the slot's key mask
        (:meth:`extend_mask`) says which are valid for each sample.
        """
        if self.keys[layer] is None:
            shape = (batch, k.shape[1], max(length + 1, 16), k.shape[3])
            self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
            self.lengths[layer] = length
        target = index[:, None, :, None].expand_as(k)
        for store, new in ((self.keys[layer], k), (self.values[layer], v)):
            store[rows] = store[rows].scatter(2, target, new)

    def extend_mask(self, layer: int, valid: torch.Tensor) -> torch.Tensor:
        """Append the validity ``[B, n]`` of the keys just written to ``layer``; return all of it."""
        old = self.key_masks[layer]
        self.key_masks[layer] = valid.bool() if old is None else torch.cat([old, valid.bool()], dim=1)
        return self.key_masks[layer]

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        """Former name of :attr:`position_offset` (Qwen2-VL's term)."""
        return self.position_offset

    def nbytes(self) -> int:
        """Bytes of keys and values held (valid or not, spare capacity excluded)."""
        total = sum(2 * k[:, :, :n].numel() * k.element_size() for k, n in zip(self.keys, self.lengths, strict=False) if k is not None)
        return total + sum((k.numel() + v.numel()) * k.element_size() for k, v, _ in self.cross.values())

    def nbytes_per_sample(self) -> list[int]:
        """Bytes of *valid* keys and values per sample (padding and skipped visual tokens excluded)."""
        slots = [(k, mask) for k, mask in zip(self.keys, self.key_masks, strict=False) if k is not None and mask is not None]
        slots += [(k, valid) for k, _, valid in self.cross.values()]
        if not slots:
            return []
        totals = torch.zeros(slots[0][0].shape[0], dtype=torch.long)
        for k, mask in slots:
            totals += mask.sum(1).cpu() * (2 * k.shape[1] * k.shape[3] * k.element_size())
        return totals.tolist()


class RowWriter:
    """What a decoder layer sees as its cache when only some samples' tokens are its input.

    A layer writes its new keys/values with ``cache.update(layer, k, v)``; this stand-in writes
    them for samples ``rows`` at sequence positions ``index`` of the one shared slot (see
    :meth:`KVCache.write_rows`) and hands the same keys/values back, which at a prefill are all the
    layer attends to.
    """

    def __init__(self, cache: KVCache, rows: torch.Tensor, index: torch.Tensor, batch: int, length: int):
        self.cache, self.rows, self.index, self.batch, self.length = cache, rows, index, batch, length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.write_rows(layer, self.rows, self.index, k, v, self.batch, self.length)
        return k, v
