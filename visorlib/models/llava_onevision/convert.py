"""Hugging Face -> visorlib conversion: configs and state-dict key maps.

The maps are explicit tables (torchtune's habit) so a reader can see every rename in one place.
Three on-disk layouts of LLaVA-OneVision exist and all load:

* transformers 4.x hub checkpoints: ``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``;
* transformers 5.x ``save_pretrained``: the same but ``vision_tower.*`` without ``vision_model``;
* transformers 5.x in-memory names: ``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...config import DecoderConfig, ImageProcessingConfig, ModelConfig, TokensConfig, VisionConfig
from ...modules.convert import (
    TIED_LM_HEAD,
    check_rope_types,
    qwen2_decoder_config,
    rename_keys,
    require_value,
)
from .siglip import siglip_key_map

__all__ = ["HF_LLAVA_ONEVISION_KEYS", "check_rope_types", "config_from_hf", "convert_llava_onevision_state",
           "decoder_config_from_hf"]

# (pattern, replacement) applied in order to every Hugging Face key (see rename_keys).
HF_LLAVA_ONEVISION_KEYS: list[tuple[str, str]] = [
    (r"^model\.(language_model|vision_tower|multi_modal_projector|image_newline)", r"\1"),
    (r"^language_model\.model\.", "decoder."),
    (r"^language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^language_model\.", "decoder."),
    (r"^vision_tower\.(vision_model\.)?", "vision_tower."),
    (r"^multi_modal_projector\.", "projector."),
    (r"^image_newline$", "image_newline"),
]

# Present in some checkpoints but not part of LLaVA-OneVision's computation: SigLIP's attention
# pooling head (built when ``vision_use_head`` is true) is never used for the visual tokens.
HF_IGNORED_KEYS = (r"^vision_tower\.head\.",)

# The language model's values for keys a config.json omits (LLaVA-OneVision-0.5B's Qwen2).
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
)


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

    Raises:
        CheckpointError: for keys none of the three layouts has.
    """
    ignored = HF_IGNORED_KEYS + ((TIED_LM_HEAD,) if tied else ())
    out = rename_keys(hf_state, HF_LLAVA_ONEVISION_KEYS, ignored=ignored, source="LLaVA-OneVision checkpoint")
    vision = {key[len("vision_tower."):]: out.pop(key) for key in list(out) if key.startswith("vision_tower.")}
    out.update({"vision_tower." + k: v for k, v in vision_map(vision).items()})
    return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json", name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face LLaVA-OneVision ``config.json``.

    Raises:
        ConfigError: for model types or options visorlib does not implement (named in the message).
    """
    require_value(source, "model_type", hf.get("model_type"), ("llava_onevision",))
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    require_value(source, "text_config.model_type", text.get("model_type", "qwen2"), ("qwen2",))
    require_value(source, "vision_config.model_type", vision.get("model_type", "siglip_vision_model"),
                  ("siglip_vision_model",))
    require_value(source, "vision_feature_layer", hf.get("vision_feature_layer", -1), (-1,))
    require_value(source, "vision_feature_select_strategy", hf.get("vision_feature_select_strategy", "full"), ("full",))
    require_value(source, "vision_config.hidden_act", vision.get("hidden_act", "gelu_pytorch_tanh"),
                  ("gelu_pytorch_tanh", "gelu_tanh"))
    require_value(source, "multimodal_projector_bias", hf.get("multimodal_projector_bias", True), (True,))
    decoder = qwen2_decoder_config(hf, source, TEXT_DEFAULTS)
    vision_cfg = VisionConfig(
        image_size=vision.get("image_size", 384),
        patch_size=vision.get("patch_size", 14),
        hidden_size=vision.get("hidden_size", 1152),
        intermediate_size=vision.get("intermediate_size", 4304),
        num_layers=vision.get("num_hidden_layers", 26),
        num_heads=vision.get("num_attention_heads", 16),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
    )
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
    return ModelConfig(name=name or hf.get("_name_or_path") or "llava-onevision", family="llava_onevision",
                       description="converted from a Hugging Face LLaVA-OneVision checkpoint", vision=vision_cfg,
                       decoder=decoder, projector_act={"gelu_pytorch_tanh": "gelu_tanh"}.get(act, act),
                       processing=processing, tokens=tokens)


def decoder_config_from_hf(text: dict[str, Any], tied: bool, source: str = "config.json") -> DecoderConfig:
    """A :class:`DecoderConfig` from a Hugging Face Qwen2 ``text_config`` (or a flat Qwen2 config).

    Kept for callers of the earlier API: :func:`visorlib.modules.convert.qwen2_decoder_config`
    with LLaVA-OneVision's defaults, the tie given explicitly.

    Args:
        text: The Qwen2 fields (``hidden_size``, ``num_hidden_layers``, ``rope_parameters`` ...).
        tied: Whether the LM head shares the embedding matrix.
        source: Named in errors.
    """
    return qwen2_decoder_config({**text, "tie_word_embeddings": tied}, source, TEXT_DEFAULTS)
