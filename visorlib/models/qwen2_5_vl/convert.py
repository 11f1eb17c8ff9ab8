"""Hugging Face Qwen2.5-VL -> visorlib: the ``config.json`` reader and the state-dict key map.

The checkpoint layouts are Qwen2-VL's (``model.*`` / ``visual.*`` / ``lm_head.*`` on disk,
``model.language_model.*`` / ``model.visual.*`` in transformers 5's memory), and so is the key
table: the tower's new names (``norm1`` / ``norm2`` as RMSNorm, ``mlp.gate_proj`` / ``up_proj`` /
``down_proj``) fall under the generic ``visual. -> vision_tower.`` rule, and the merger's
``ln_q`` is an RMSNorm under the same name. So :func:`convert_qwen2_5_vl_state` *is* Qwen2-VL's
converter; this module reads the config, whose vision section differs (``hidden_size`` is the
tower width, ``out_hidden_size`` the decoder width, plus the window settings).
"""

from __future__ import annotations

from typing import Any

from ...config import ConfigError, ModelConfig, VisionConfig
from ...modules.convert import qwen2_decoder_config, require_value
from ..qwen2_vl.convert import TEXT_DEFAULTS, released_tokens_and_processing
from ..qwen2_vl.convert import convert_qwen2_vl_state as convert_qwen2_5_vl_state

# Qwen2_5_VLVisionConfig's values for keys a config.json omits.
VISION_DEFAULTS: dict[str, Any] = dict(
    depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
)


def config_from_hf(hf: dict[str, Any], source: str = "config.json", name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face Qwen2.5-VL ``config.json``.

    Missing keys take transformers' defaults. The image processing settings are not in
    ``config.json``; the released checkpoints' values are used (CLIP mean/std, ``min_pixels``
    3136, ``max_pixels`` 12845056).

    Raises:
        ConfigError: for model types or options visorlib does not implement (named in the message).
    """
    require_value(source, "model_type", hf.get("model_type"), ("qwen2_5_vl",))
    decoder = qwen2_decoder_config(hf, source, TEXT_DEFAULTS, mrope=True)
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    require_value(source, "vision_config.hidden_act", vision["hidden_act"], ("silu",))
    vision_rope = vision.get("rope_parameters") or {}
    require_value(source, "vision_config.rope_parameters.rope_theta", float(vision_rope.get("rope_theta", 10000.0)),
                  (10000.0,))
    out_hidden = vision.get("out_hidden_size", decoder.hidden_size)
    if out_hidden != decoder.hidden_size:
        raise ConfigError(f"{source}: vision_config.out_hidden_size {out_hidden} must equal the decoder width "
                          f"{decoder.hidden_size}")
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    vision_cfg = VisionConfig(
        kind="qwen2_5_vl",
        image_size=patch * merge,
        patch_size=patch,
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_layers=vision["depth"],
        num_heads=vision["num_heads"],
        temporal_patch_size=vision["temporal_patch_size"],
        spatial_merge_size=merge,
        in_channels=vision.get("in_chans", vision["in_channels"]),
        hidden_act="silu",
        window_size=vision["window_size"],
        fullatt_block_indexes=list(vision["fullatt_block_indexes"]),
        tokens_per_second=float(vision["tokens_per_second"]),
    )
    tokens, processing = released_tokens_and_processing(hf)
    return ModelConfig(name=name or hf.get("_name_or_path") or "qwen2.5-vl", family="qwen2_5_vl",
                       description="converted from a Hugging Face Qwen2.5-VL checkpoint", vision=vision_cfg,
                       decoder=decoder, use_image_newline=False, processing=processing, tokens=tokens)


__all__ = ["config_from_hf", "convert_qwen2_5_vl_state"]
