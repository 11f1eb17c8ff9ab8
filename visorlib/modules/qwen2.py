"""Qwen2 decoder in pure PyTorch.

Reference: Qwen2 technical report (https://arxiv.org/abs/2407.10671) and Hugging Face's
``modeling_qwen2.py``. Pre-norm decoder layers with RMSNorm, rotary positions, grouped-query
attention with biased q/k/v projections, and a SwiGLU MLP. Module names follow the Hugging Face
checkpoint (``self_attn.q_proj``, ``mlp.gate_proj`` ...) so that the key map stays a prefix change.

The layer is written once: Qwen2-VL reuses it and differs only by the rotary positions it is fed,
and VISOR's executor calls :meth:`Qwen2DecoderLayer.forward` on whichever token subset a layer's
role asks for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DecoderConfig
from ..registry import register_decoder
from .cache import KVCache
from .layers import RMSNorm, RotaryEmbedding, apply_rotary, attend


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        implementation: str,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        cos, sin = rope
        q = apply_rotary(self.split_heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rotary(self.split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # No mask means no padding: causal when queries and keys are the same tokens (a prefill,
        # with or without a cache); a decode step's single query may see every cached key.
        out = attend(q, k, v, mask, implementation, is_causal=mask is None and q.shape[2] == k.shape[2])
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))


class Qwen2MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    gradient_checkpointing = False  # set by the trainer: recompute this layer in backward

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        implementation: str = "sdpa",
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(self._forward, x, rope, mask, implementation, None, layer, use_reentrant=False)
        return self._forward(x, rope, mask, implementation, cache, layer)

    def _forward(self, x, rope, mask, implementation, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, implementation, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Module):
    """Token embedding, a stack of :class:`Qwen2DecoderLayer`, final norm and LM head.

    The layers are run by :class:`~visorlib.visor.executor.PlanExecutor`, which decides per layer
    which tokens each one sees (all of them for a dense model).

    Args:
        cfg: Decoder hyper-parameters.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:
        """The LM head matrix (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""
        return F.linear(self.norm(hidden), self.head_weight())


@register_decoder("qwen2")
def build_qwen2(cfg: DecoderConfig) -> nn.Module:
    """The ``decoder.kind: qwen2`` decoder (also Qwen2-VL's, with M-RoPE from ``mrope_section``)."""
    return Qwen2Decoder(cfg)
