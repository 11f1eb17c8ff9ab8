"""Analytic FLOPs and KV-cache bytes of a prefill, per component.

Counting rules (the same as ``torch.utils.flop_counter.FlopCounterMode``, so the two can be
checked against each other): a matmul of ``[m, k] @ [k, n]`` costs ``2*m*k*n``; attention costs
``2 * Lq * Lk * head_dim`` per head for the scores and the same again for the weighted sum, over
the *full* ``Lq x Lk`` rectangle (SDPA does not skip the masked half); norms, activations,
rotary embeddings and softmax are ignored (they are O(L*d), below 1 % at these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DecoderConfig, ModelConfig, VisionConfig


@dataclass
class FlopReport:
    """FLOPs per component of one forward pass, plus the KV cache it leaves behind.

    Attributes:
        components: Ordered ``{name: flops}`` (``vision_tower``, ``projector``, ``decoder``, ``lm_head``).
        kv_cache_bytes: Bytes of keys and values cached for later decoding.
        n_visual: Visual tokens in the decoder's sequence.
        n_text: Text tokens in the decoder's sequence.
    """

    components: dict[str, float] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    n_visual: int = 0
    n_text: int = 0

    @property
    def total(self) -> float:
        """Sum over components."""
        return float(sum(self.components.values()))


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    """A dense layer applied to ``tokens`` rows."""
    return 2.0 * tokens * fan_in * fan_out


def attention_core_flops(q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """Scores (``QK^T``) plus weighted sum (``AV``), full rectangle."""
    return 4.0 * q_len * k_len * heads * head_dim


def vision_tower_flops(cfg: VisionConfig, tiles: int) -> float:
    """ViT forward over ``tiles`` tiles (patch embedding + blocks)."""
    tokens = cfg.tokens_per_tile
    per_tile = linear_flops(tokens, 3 * cfg.patch_size**2, cfg.hidden_size)
    block = (
        linear_flops(tokens, cfg.hidden_size, 3 * cfg.hidden_size)
        + attention_core_flops(tokens, tokens, cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        + linear_flops(tokens, cfg.hidden_size, cfg.hidden_size)
        + 2 * linear_flops(tokens, cfg.hidden_size, cfg.intermediate_size)
    )
    return tiles * (per_tile + cfg.num_layers * block)


def decoder_layer_flops(cfg: DecoderConfig, q_len: int, k_len: int | None = None) -> float:
    """One decoder layer: ``q_len`` new tokens attending to ``k_len`` keys (default: themselves)."""
    k_len = q_len if k_len is None else k_len
    kv_width = cfg.num_kv_heads * cfg.head_dim
    return (
        linear_flops(q_len, cfg.hidden_size, cfg.hidden_size + 2 * kv_width)
        + attention_core_flops(q_len, k_len, cfg.num_heads, cfg.head_dim)
        + linear_flops(q_len, cfg.hidden_size, cfg.hidden_size)
        + 3 * linear_flops(q_len, cfg.hidden_size, cfg.intermediate_size)
    )


def kv_bytes_per_token(cfg: DecoderConfig, bytes_per_value: int = 2) -> int:
    """Cache bytes one token costs in one layer (keys + values)."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * bytes_per_value


def dense_prefill_flops(
    cfg: ModelConfig,
    n_visual: int,
    n_text: int,
    tiles: int = 0,
    logits_for: int = 1,
    bytes_per_value: int = 2,
) -> FlopReport:
    """FLOPs of a dense prefill: every decoder layer over ``[visual; text]``.

    Args:
        cfg: The model.
        n_visual: Visual tokens in the sequence.
        n_text: Text tokens in the sequence.
        tiles: Tiles (or frames) through the vision tower; 0 counts the language model only.
        logits_for: Positions whose logits are computed (1 for generation, the length for training).
        bytes_per_value: Cache element size (2 for bf16/fp16).
    """
    length = n_visual + n_text
    report = FlopReport(n_visual=n_visual, n_text=n_text)
    report.components["vision_tower"] = vision_tower_flops(cfg.vision, tiles)
    tile_tokens = tiles * cfg.vision.tokens_per_tile
    report.components["projector"] = linear_flops(tile_tokens, cfg.vision.hidden_size, cfg.decoder.hidden_size) + (
        linear_flops(tile_tokens, cfg.decoder.hidden_size, cfg.decoder.hidden_size)
    )
    report.components["decoder"] = cfg.decoder.num_layers * decoder_layer_flops(cfg.decoder, length)
    report.components["lm_head"] = linear_flops(logits_for, cfg.decoder.hidden_size, cfg.decoder.vocab_size)
    report.kv_cache_bytes = cfg.decoder.num_layers * length * kv_bytes_per_token(cfg.decoder, bytes_per_value)
    return report


def flops(
    model_or_name,
    n_visual: int,
    n_text: int,
    tiles: int = 0,
    sa_layers: object = None,
    logits_for: int = 1,
) -> FlopReport:
    """Analytic prefill FLOPs and KV-cache bytes for a model, a card name or a :class:`ModelConfig`.

    Args:
        model_or_name: A built model (anything with ``.cfg``), a zoo card name, or a config.
        n_visual: Visual tokens in the language model's sequence.
        n_text: Text tokens in the sequence.
        tiles: Tiles through the vision tower (0: language model only, as the VISOR paper counts).
        sa_layers: Layer configuration; dense models accept None or ``"all"``.
        logits_for: Positions whose logits are computed.
    """
    if isinstance(model_or_name, ModelConfig):
        cfg = model_or_name
    elif isinstance(model_or_name, str):
        from .zoo import get_config

        cfg = get_config(model_or_name)
    else:
        cfg = model_or_name.cfg
    if sa_layers not in (None, "all"):
        raise ValueError(f"sa_layers={sa_layers!r}: {cfg.name} is a dense model with no VISOR layer plan")
    return dense_prefill_flops(cfg, n_visual, n_text, tiles, logits_for)
