"""Shared, family-free building blocks: norms, attention, RoPE / M-RoPE, the Qwen2 decoder, the KV cache,
FLOP-counting rules and the converter helpers. Every family uses them; none of them names a family.

Importing this package registers the ``qwen2`` decoder (:func:`visorlib.registry.register_decoder`).
"""

from .cache import KVCache
from .layers import RMSNorm, RotaryEmbedding, apply_rotary, attend, causal_padding_mask, positions_from_mask
from .qwen2 import Qwen2Decoder, Qwen2DecoderLayer

__all__ = ["KVCache", "Qwen2Decoder", "Qwen2DecoderLayer", "RMSNorm", "RotaryEmbedding", "apply_rotary", "attend",
           "causal_padding_mask", "positions_from_mask"]
