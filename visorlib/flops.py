"""Analytic FLOPs and KV-cache bytes of a prefill, per component.

Counting rules (the same as ``torch.utils.flop_counter.FlopCounterMode``, so the two can be
checked against each other): a matmul of ``[m, k] @ [k, n]`` costs ``2*m*k*n``; attention costs
``2 * Lq * Lk * head_dim`` per head for the scores and the same again for the weighted sum, over
the *full* ``Lq x Lk`` rectangle (SDPA does not skip the masked half); norms, activations,
rotary embeddings and softmax are ignored (they are O(L*d), below 1 % at these sizes).
The one exception to "analytic" is FastVLM's FastViT tower, whose FLOPs are counted once per
configuration on the meta device (:func:`counted_tower_flops`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .config import DecoderConfig, ModelConfig, VisionConfig


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


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    """A dense layer applied to ``tokens`` rows."""
    return 2.0 * tokens * fan_in * fan_out


def attention_core_flops(q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """Scores (``QK^T``) plus weighted sum (``AV``), full rectangle."""
    return 4.0 * q_len * k_len * heads * head_dim


def vision_tower_flops(cfg: VisionConfig, tiles: int | Sequence[int]) -> float:
    """ViT forward over ``tiles`` tiles (patch embedding + blocks); FastViT is counted, see below.

    For ``qwen2_vl`` (no tiles) ``tiles`` counts *patches* instead: those of one attention
    sequence (one image, or one temporal patch of a video), or a list with one count per sequence
    (see :func:`qwen2_vl_tower_flops`).
    """
    if cfg.kind == "fastvit":
        return tiles * counted_tower_flops(cfg) if tiles else 0.0
    if cfg.kind == "qwen2_vl":
        return qwen2_vl_tower_flops(cfg, tiles)
    tokens = cfg.tokens_per_tile
    per_tile = linear_flops(tokens, 3 * cfg.patch_size**2, cfg.hidden_size)
    block = (
        linear_flops(tokens, cfg.hidden_size, 3 * cfg.hidden_size)
        + attention_core_flops(tokens, tokens, cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        + linear_flops(tokens, cfg.hidden_size, cfg.hidden_size)
        + 2 * linear_flops(tokens, cfg.hidden_size, cfg.intermediate_size)
    )
    return tiles * (per_tile + cfg.num_layers * block)


def _sequences(patches: int | Sequence[int]) -> list[int]:
    return [patches] if isinstance(patches, int) else [int(n) for n in patches]


def qwen2_vl_tower_flops(cfg: VisionConfig, patches: int | Sequence[int]) -> float:
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


def qwen2_vl_merger_flops(cfg: VisionConfig, patches: int | Sequence[int], out_dim: int) -> float:
    """Qwen2-VL's patch merger (the projector): 2x2 patches -> one token of width ``out_dim``."""
    tokens = sum(_sequences(patches)) // cfg.spatial_merge_size**2
    merged = cfg.hidden_size * cfg.spatial_merge_size**2
    return linear_flops(tokens, merged, merged) + linear_flops(tokens, merged, out_dim)


def counted_tower_flops(cfg: VisionConfig) -> float:
    """FLOPs of one tile through the vision tower, counted by running it on the meta device.

    A formula for FastViT would have to follow dozens of convolution shapes (re-parameterised
    stems, depth-wise mixers, strided downsampling, squeeze-excite) and drift whenever timm
    changes; instead the tower is built on the meta device (no memory, no arithmetic) and one
    ``[1, 3, S, S]`` tile is pushed through it under ``FlopCounterMode``, which applies the same
    counting rules as the rest of this module. The result is cached per tower configuration.
    """
    return _counted_tower_flops(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


@lru_cache(maxsize=32)
def _counted_tower_flops(cfg_json: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .backbones import build_vision_tower

    cfg = VisionConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        tower = build_vision_tower(cfg)
        pixels = torch.empty(1, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(pixels)
    return float(counter.get_total_flops())


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
    from .blocks.plan import LayerPlan, validate_sa_layers

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
            Qwen2-VL, patches (an int, or one count per frame; see :func:`vision_tower_flops`).
        sa_layers: Configuration (None = the card's default, ``"all"``, or a list of SA layers).
        logits_for: Positions whose logits are computed (1 for generation).
        bytes_per_value: KV-cache element size (2 for bf16/fp16).
    """
    from .blocks.plan import CROSS, SELF, LayerPlan

    dec = cfg.decoder
    plan = LayerPlan(dec.num_layers, cfg.visor)
    executed = set(_configuration(cfg, sa_layers))
    report = FlopReport(n_visual=n_visual, n_text=n_text)
    report.components["vision_tower"] = vision_tower_flops(cfg.vision, tiles)
    packed = cfg.feature_grid_size**2
    packing = cfg.visor is not None and cfg.visor.packing_ratio > 1
    width = cfg.vision.hidden_size * (4 if packing else 1)
    if cfg.vision.kind == "qwen2_vl":
        report.components["projector"] = qwen2_vl_merger_flops(cfg.vision, tiles, dec.hidden_size)
    else:
        report.components["projector"] = linear_flops(tiles * packed, width, dec.hidden_size) + linear_flops(
            tiles * packed, dec.hidden_size, dec.hidden_size
        )
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
    from .blocks.plan import CROSS, SELF, LayerPlan

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
            patches for Qwen2-VL (see :func:`vision_tower_flops`).
        sa_layers: Configuration: None (card default), ``"all"``, or a list of SA layers.
        logits_for: Positions whose logits are computed.
    """
    if isinstance(model_or_name, ModelConfig):
        cfg = model_or_name
    elif isinstance(model_or_name, str):
        from .zoo import get_config

        cfg = get_config(model_or_name)
    else:
        cfg = model_or_name.cfg
    return prefill_flops(cfg, n_visual, n_text, tiles, sa_layers, logits_for)
