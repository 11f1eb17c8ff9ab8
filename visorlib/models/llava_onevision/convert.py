"""Hugging Face -> visorlib conversion: configs and state-dict key maps.

The maps are explicit tables (torchtune's habit) so a reader can see every rename in one place.
Three on-disk layouts of LLaVA-OneVision exist and all load:

* transformers 4.x hub checkpoints: ``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``;
* transformers 5.x ``save_pretrained``: the same but ``vision_tower.*`` without ``vision_model``;
* transformers 5.x in-memory names: ``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from ...config import (
    ConfigError,
    DecoderConfig,
    ImageProcessingConfig,
    ModelConfig,
    TokensConfig,
    VisionConfig,
)
from .siglip import siglip_key_map

# (pattern, replacement) applied in order to every Hugging Face key.
HF_LLAVA_ONEVISION_KEYS: list[tuple[str, str]] = [
    (r"^model\.(language_model|vision_tower|multi_modal_projector|image_newline)", r"\1"),
    (r"^language_model\.model\.", "decoder."),
    (r"^language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^language_model\.", "decoder."),
    (r"^vision_tower\.(vision_model\.)?", "vision_tower."),
    (r"^multi_modal_projector\.", "projector."),
]

# Present in some checkpoints but not part of LLaVA-OneVision's computation: SigLIP's attention
# pooling head (built when ``vision_use_head`` is true) is never used for the visual tokens.
HF_IGNORED_KEYS = re.compile(r"^vision_tower\.head\.")


def convert_llava_onevision_state(
    hf_state: dict[str, torch.Tensor],
    tied: bool,
    vision_map: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = siglip_key_map,
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face LLaVA-OneVision state dict to visorlib's module names.

    Args:
        hf_state: Tensors keyed as in any of the three layouts above.
        tied: Whether the model ties its LM head to the embeddings (an ``lm_head`` in the file is
            then dropped, as transformers does).
        vision_map: Converts the vision tower's keys (relative to ``vision_tower.``); SigLIP's by
            default. FastVLM, whose transformers layout is otherwise the same, passes ``dict``.
    """
    out: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        new = key
        for pattern, repl in HF_LLAVA_ONEVISION_KEYS:
            new = re.sub(pattern, repl, new)
        if HF_IGNORED_KEYS.match(new) or (tied and new == "decoder.lm_head.weight"):
            continue
        if new.startswith("vision_tower."):
            vision[new[len("vision_tower."):]] = value
        else:
            out[new] = value
    out.update({"vision_tower." + k: v for k, v in vision_map(vision).items()})
    return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json", name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face LLaVA-OneVision ``config.json``.

    Raises:
        ConfigError: for model types or options visorlib does not implement (named in the message).
    """
    model_type = hf.get("model_type")
    if model_type != "llava_onevision":
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: 'llava_onevision')")
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if text.get("model_type", "qwen2") != "qwen2":
        raise ConfigError(f"{source}: text_config.model_type {text.get('model_type')!r} is not supported (qwen2 only)")
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"{source}: vision_config.model_type {vision.get('model_type')!r} is not supported")
    for key, expected in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "full")):
        if hf.get(key, expected) != expected:
            raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (only {expected!r})")
    if vision.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{source}: vision_config.hidden_act {vision['hidden_act']!r} is not supported")
    decoder = decoder_config_from_hf(text, bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings")), source)
    vision_cfg = VisionConfig(
        image_size=vision.get("image_size", 384),
        patch_size=vision.get("patch_size", 14),
        hidden_size=vision.get("hidden_size", 1152),
        intermediate_size=vision.get("intermediate_size", 4304),
        num_layers=vision.get("num_hidden_layers", 26),
        num_heads=vision.get("num_attention_heads", 16),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
    )
    if not hf.get("multimodal_projector_bias", True):
        raise ConfigError(f"{source}: multimodal_projector_bias=false is not supported")
    act = hf.get("projector_hidden_act", "gelu")
    processing = ImageProcessingConfig(
        grid_pinpoints=[list(p) for p in hf["image_grid_pinpoints"]] if hf.get("image_grid_pinpoints") else None,
        vision_aspect_ratio=hf.get("vision_aspect_ratio", "anyres_max_9"),
    )
    defaults = TokensConfig()
    tokens = TokensConfig(
        image_token_id=hf.get("image_token_index", hf.get("image_token_id", defaults.image_token_id)),
        video_token_id=hf.get("video_token_index", hf.get("video_token_id", defaults.video_token_id)),
    )
    return ModelConfig(
        name=name or hf.get("_name_or_path") or "llava-onevision",
        family="llava_onevision",
        description="converted from a Hugging Face LLaVA-OneVision checkpoint",
        vision=vision_cfg,
        decoder=decoder,
        projector_act={"gelu_pytorch_tanh": "gelu_tanh"}.get(act, act),
        processing=processing,
        tokens=tokens,
    )


def check_rope_types(source: str, text: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse rotary scaling visorlib does not implement, wherever the config spells it.

    transformers 5 writes ``rope_parameters: {rope_type: ...}``; older files write
    ``rope_scaling: {type: ...}`` (or ``rope_type``), and transformers still honours those, so a
    ``rope_scaling: {type: yarn}`` read as plain RoPE would be a silently different model.
    """
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: text_config.{key} must be a mapping or null, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in allowed:
            raise ConfigError(
                f"{source}: text_config.{key} type {kind!r} is not supported (visorlib implements "
                f"{' and '.join(map(repr, allowed))} rotary positions only)"
            )


def decoder_config_from_hf(text: dict[str, Any], tied: bool, source: str = "config.json") -> DecoderConfig:
    """A :class:`DecoderConfig` from a Hugging Face Qwen2 ``text_config`` (or a flat Qwen2 config).

    Args:
        text: The Qwen2 fields (``hidden_size``, ``num_hidden_layers``, ``rope_parameters`` ...).
        tied: Whether the LM head shares the embedding matrix.
        source: Named in errors.

    Raises:
        ConfigError: for rotary scaling or head sizes visorlib does not implement.
    """
    check_rope_types(source, text, ("default",))
    rope = text.get("rope_parameters") or {}
    heads = text.get("num_attention_heads", 14)
    hidden = text.get("hidden_size", 896)
    if text.get("head_dim", hidden // heads) != hidden // heads:
        raise ConfigError(f"{source}: text_config.head_dim must equal hidden_size / num_attention_heads")
    return DecoderConfig(
        vocab_size=text.get("vocab_size", 152000),
        hidden_size=hidden,
        intermediate_size=text.get("intermediate_size", 4864),
        num_layers=text.get("num_hidden_layers", 24),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", heads),
        rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        tie_word_embeddings=tied,
    )
