"""The running decode batch: one KV cache whose rows join and leave between steps.

:class:`~visorlib.modules.cache.KVCache` is built for one ``generate`` call: all rows are
prefilled together and decoded together. Continuous batching needs rows to join (a newly
prefilled request) and leave (a finished or cancelled one) between decode steps. Both are plain
tensor surgery on the cache, done here without changing the cache itself:

* **join** (:func:`concat_caches`): per layer, each cache's keys/values are *left*-padded to the
  longest of them, their key-validity masks padded with False; cross-attention keys/values are
  padded on the right (visual tokens are unordered keys under their own validity mask); the
  attention masks are left-padded with zeros. Rotary positions count real tokens
  (``attention_mask.cumsum``), so padding never moves a position, and a padded key is masked out
  of every attention, so each row attends to exactly what it would alone.
* **leave** (:func:`select_rows`): keep some rows, then cut the leading columns no remaining row
  uses (so the batch does not keep paying for a long request that has left).

A row's configuration lives in its cache (which layers hold visual keys, which cross-attention
layers read what), so rows of different configurations share one batch: a decode step is the
same computation for all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modules.cache import KVCache

# Spare columns given to every rebuilt slot, so the next decode steps write in place instead of
# making KVCache.update regrow (copy) the buffer at once.
HEADROOM = 32


def _left_pad(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad, value=value)


def _right_pad(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad, value=value)


def _with_headroom(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t [B, H, length, d]`` copied into a buffer with :data:`HEADROOM` spare columns."""
    out = t.new_empty(*t.shape[:2], length + HEADROOM, t.shape[3])
    out[:, :, :length] = t
    return out


def concat_caches(caches: list[KVCache], masks: list[torch.Tensor]) -> tuple[KVCache, torch.Tensor]:
    """Stack the rows of several caches (and their attention masks) into one batch.

    Args:
        caches: Filled caches of the same model (after a prefill or decode steps).
        masks: Each cache's attention mask ``[B_i, cache.seen]``.

    Returns:
        ``(cache, attention_mask)`` of all rows, in order.
    """
    if len(caches) == 1:
        return caches[0], masks[0]
    num_layers = len(caches[0].keys)
    out = KVCache(num_layers)
    for layer in range(num_layers):
        if any(c.keys[layer] is None for c in caches):
            raise RuntimeError(f"layer {layer} of a cache to batch was never written; prefill every request first")
        length = max(c.lengths[layer] for c in caches)
        for store, source in ((out.keys, [c.keys for c in caches]), (out.values, [c.values for c in caches])):
            parts = [_left_pad(s[layer][:, :, : c.lengths[layer]], length, 2) for s, c in zip(source, caches, strict=True)]
            store[layer] = _with_headroom(torch.cat(parts), length)
        out.key_masks[layer] = torch.cat([_left_pad(c.key_masks[layer], length, 1, False) for c in caches])
        out.lengths[layer] = length
    for layer in caches[0].cross:
        width = max(c.cross[layer][0].shape[2] for c in caches)
        k = torch.cat([_right_pad(c.cross[layer][0], width, 2) for c in caches])
        v = torch.cat([_right_pad(c.cross[layer][1], width, 2) for c in caches])
        valid = torch.cat([_right_pad(c.cross[layer][2], width, 1, False) for c in caches])
        out.cross[layer] = (k, v, valid)
    out.seen = max(c.seen for c in caches)
    offsets = [c.position_offset for c in caches]
    if any(o is not None for o in offsets):
        out.position_offset = torch.cat([o if o is not None else torch.zeros(m.shape[0], 1, dtype=torch.long,
                                                                              device=m.device)
                                         for o, m in zip(offsets, masks, strict=True)])
    mask = torch.cat([_left_pad(m, out.seen, 1) for m in masks])
    return out, mask


def select_rows(cache: KVCache, mask: torch.Tensor, rows: list[int]) -> tuple[KVCache, torch.Tensor]:
    """Keep ``rows`` of a batch, dropping the leading columns none of them uses.

    Args:
        cache: The batch's cache.
        mask: Its attention mask ``[B, cache.seen]``.
        rows: Row indices to keep, in the order wanted.

    Returns:
        ``(cache, attention_mask)`` of the kept rows.
    """
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    out = KVCache(len(cache.keys))
    for layer, keys in enumerate(cache.keys):
        if keys is None:
            continue
        valid = cache.key_masks[layer].index_select(0, index)
        start = int(valid.any(0).long().argmax())  # first column some kept row attends to
        end = cache.lengths[layer]
        out.keys[layer] = _with_headroom(keys.index_select(0, index)[:, :, start:end], end - start)
        out.values[layer] = _with_headroom(cache.values[layer].index_select(0, index)[:, :, start:end], end - start)
        out.key_masks[layer] = valid[:, start:]
        out.lengths[layer] = end - start
    for layer, (k, v, valid) in cache.cross.items():
        out.cross[layer] = (k.index_select(0, index), v.index_select(0, index), valid.index_select(0, index))
    kept = mask.index_select(0, index)
    start = int(kept.bool().any(0).long().argmax())
    out.seen = cache.seen - start
    if cache.position_offset is not None:
        out.position_offset = cache.position_offset.index_select(0, index)
    return out, kept[:, start:]
