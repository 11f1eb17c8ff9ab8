"""Analytic FLOPs and KV-cache bytes of a prefill, per component.

Counting rules (the same as ``torch.utils.flop_counter.FlopCounterMode``, so the two can be
checked against each other): a matmul of ``[m, k] @ [k, n]`` costs ``2*m*k*n``; attention costs
``2 * Lq * Lk * head_dim`` per head for the scores and the same again for the weighted sum, over
the *full* ``Lq x Lk`` rectangle (SDPA does not skip the masked half); norms, activations,
rotary embeddings and softmax are ignored (they are O(L*d), below 1 % at these sizes).
The one exception to "analytic" is FastVLM's FastViT tower, whose FLOPs are counted once per
configuration on the meta device (:func:`~visorlib.modules.counting.counted_tower_flops`).
Each family supplies its tower and projector formulas (:class:`~visorlib.registry.Family`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import DecoderConfig, ModelConfig
from .modules.counting import attention_core_flops, linear_flops
from .registry import family_of
from .visor.plan import CROSS, SELF, LayerPlan
from .zoo import get_config


@dataclass
class FlopReport:
    """FLOPs per component of one forward pass, plus the KV cache it leaves behind.

    Attributes:
        components: Ordered ``{name: flops}`` (``vision_tower``, ``projector``, ``decoder``, ``lm_head``).
        kv_cache_bytes: Bytes of keys and values cached for later decoding.
        n_visual: Visual tokens in the decoder's sequence.
        n_text: Text tokens in the decoder's sequence.
        decode_step: FLOPs of generating the first token after this prefill.
    """

    components: dict[str, float] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    n_visual: int = 0
    n_text: int = 0
    decode_step: float = 0.0

    @property
    def language_model(self) -> float:
        """Decoder layers, cross-attention and LM head: what the VISOR paper's FLOP counts cover."""
        return self.total - self.components.get("vision_tower", 0.0) - self.components.get("projector", 0.0)

    @property
    def total(self) -> float:
        """Sum over components."""
        return float(sum(self.components.values()))


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


def cross_attention_flops(cfg: DecoderConfig, n_text: int, n_visual: int, project_visual: bool = True) -> float:
    """One cross-attention block: q/o on text, k/v on visual (unless cached), scores and sum."""
    kv_width = cfg.num_kv_heads * cfg.head_dim
    flops = linear_flops(n_text, cfg.hidden_size, cfg.hidden_size) * 2
    flops += attention_core_flops(n_text, n_visual, cfg.num_heads, cfg.head_dim)
    if project_visual:
        flops += linear_flops(n_visual, cfg.hidden_size, 2 * kv_width)
    return flops


def _configuration(cfg: ModelConfig, sa_layers: object) -> list[int]:
    """The one configuration ``sa_layers`` names, checked by the rule every entry point uses."""
    from .visor.plan import LayerPlan, validate_sa_layers

    plan = LayerPlan(cfg.decoder.num_layers, cfg.visor)
    if isinstance(sa_layers, str) and sa_layers != "all" and not plan.dense:
        raise ValueError(f"sa_layers={sa_layers!r}: FLOPs need a concrete configuration (a list of layers)")
    (configuration,) = validate_sa_layers(plan, sa_layers, 1, model=cfg.name)
    return configuration


def prefill_flops(
    cfg: ModelConfig,
    n_visual: int,
    n_text: int,
    tiles: int | Sequence[int] = 0,
    sa_layers: object = None,
    logits_for: int = 1,
    bytes_per_value: int = 2,
) -> FlopReport:
    """FLOPs of one prefill under a layer configuration (dense models: every layer over all tokens).

    Args:
        cfg: The model.
        n_visual: Visual tokens in the language model's sequence (after any packing).
        n_text: Text tokens in the sequence.
        tiles: Tiles (or frames) through the vision tower; 0 counts the language model only. For
            Qwen2-VL, patches (an int, or one count per frame; see the family's ``tower_flops``).
        sa_layers: Configuration (None = the card's default, ``"all"``, or a list of SA layers).
        logits_for: Positions whose logits are computed (1 for generation).
        bytes_per_value: KV-cache element size (2 for bf16/fp16).
    """
    dec = cfg.decoder
    plan = LayerPlan(dec.num_layers, cfg.visor)
    executed = set(_configuration(cfg, sa_layers))
    report = FlopReport(n_visual=n_visual, n_text=n_text)
    family = family_of(cfg)
    report.components["vision_tower"] = family.tower_flops(cfg.vision, tiles) if tiles else 0.0
    report.components["projector"] = family.projector_flops(cfg, tiles) if tiles else 0.0
    text_layers = self_layers = cross = 0.0
    cached_tokens = 0
    for index, role in enumerate(plan.roles):
        if role == SELF and index in executed:
            self_layers += decoder_layer_flops(dec, n_visual + n_text)
            cached_tokens += n_visual + n_text
            continue
        if role == CROSS:
            cross += cross_attention_flops(dec, n_text, n_visual)
            cached_tokens += n_visual  # the projected visual keys/values are kept for decoding
        text_layers += decoder_layer_flops(dec, n_text)
        cached_tokens += n_text
    report.components["decoder_self_attention_layers"] = self_layers
    report.components["decoder_text_only_layers"] = text_layers
    report.components["cross_attention"] = cross
    report.components["lm_head"] = linear_flops(logits_for, dec.hidden_size, dec.vocab_size)
    report.kv_cache_bytes = cached_tokens * kv_bytes_per_token(dec, bytes_per_value)
    report.decode_step = decode_step_flops(cfg, n_visual, n_text, sa_layers)
    return report


def decode_step_flops(cfg: ModelConfig, n_visual: int, n_context_text: int, sa_layers: object = None) -> float:
    """FLOPs of generating one token after a prefill of ``n_visual`` + ``n_context_text`` tokens.

    Text-only (and skipped) layers attend over the cached text, executed SA layers over visual +
    text, and cross-attention layers read visual keys/values cached at prefill.
    """
    dec = cfg.decoder
    plan = LayerPlan(dec.num_layers, cfg.visor)
    executed = set(_configuration(cfg, sa_layers))
    total = linear_flops(1, dec.hidden_size, dec.vocab_size)
    for index, role in enumerate(plan.roles):
        if role == SELF and index in executed:
            total += decoder_layer_flops(dec, 1, n_visual + n_context_text + 1)
            continue
        if role == CROSS:
            total += cross_attention_flops(dec, 1, n_visual, project_visual=False)
        total += decoder_layer_flops(dec, 1, n_context_text + 1)
    return total


def flops(
    model_or_name,
    n_visual: int,
    n_text: int,
    tiles: int | Sequence[int] = 0,
    sa_layers: object = None,
    logits_for: int = 1,
) -> FlopReport:
    """Analytic prefill FLOPs, decode-step FLOPs and KV-cache bytes of a model.

    Args:
        model_or_name: A built model (anything with ``.cfg``), a zoo card name, or a config.
        n_visual: Visual tokens in the language model's sequence.
        n_text: Text tokens in the sequence.
        tiles: Tiles through the vision tower (0: language model only, as the VISOR paper counts);
            patches for Qwen2-VL (see the family's ``tower_flops``).
        sa_layers: Configuration: None (card default), ``"all"``, or a list of SA layers.
        logits_for: Positions whose logits are computed.
    """
    if isinstance(model_or_name, ModelConfig):
        cfg = model_or_name
    elif isinstance(model_or_name, str):
        cfg = get_config(model_or_name)
    else:
        cfg = model_or_name.cfg
    return prefill_flops(cfg, n_visual, n_text, tiles, sa_layers, logits_for)
