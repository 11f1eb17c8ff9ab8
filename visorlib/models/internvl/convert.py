"""Hugging Face InternVL (``-hf`` checkpoints, transformers' ``internvl``) -> visorlib.

The converted checkpoints (``OpenGVLab/InternVL3-1B-hf``, ``-2B-hf``) and what transformers 5
saves: ``vision_tower.*`` (InternViT, transformers' names), ``multi_modal_projector.*``,
``language_model.model.*`` and ``language_model.lm_head.*``; in transformers 5's memory
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*`` and
``lm_head.*``. Both read. The original InternLM2/Qwen2 ``InternVLChatModel`` checkpoints
(``OpenGVLab/InternVL3-1B``) need remote code to run in transformers; visorlib never executes it
and does not read that layout (its fused ``qkv`` would be one more split in this table).

``config.json``: the vision section's sizes are the ViT's own (1024 wide, 14-px patches);
visorlib's card holds the *effective* ones after the pixel shuffle (4096, 28 px; see
:mod:`.vision`), so the reader multiplies them out.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import ConfigError, ImageProcessingConfig, ModelConfig, TokensConfig, VisionConfig
from ...modules.convert import TIED_LM_HEAD, qwen2_decoder_config, rename_keys, require_value

# (pattern, replacement), applied in order to every key: the in-memory names folded into the
# on-disk ones, then the on-disk ones mapped to visorlib's modules.
HF_INTERNVL_KEYS: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1."),
    (r"^language_model\.model\.", "decoder."),
    (r"^language_model\.lm_head\.", "decoder.lm_head."),
    (r"^multi_modal_projector\.", "projector."),
    (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_tower.patch_embed."),
    (r"^vision_tower\.embeddings\.cls_token$", "vision_tower.cls_token"),
    (r"^vision_tower\.embeddings\.position_embeddings$", "vision_tower.pos_embed"),
    (r"^vision_tower\.encoder\.layer\.", "vision_tower.blocks."),
]

# Qwen2Config's values for keys a config.json omits.
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
)
# InternVLVisionConfig's values for keys a config.json omits.
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
    layer_norm_eps=1e-6, image_size=[448, 448], patch_size=[14, 14], num_channels=3, attention_bias=False,
    use_qk_norm=False, norm_type="layer_norm", use_absolute_position_embeddings=True, use_mean_pooling=True,
    use_mask_token=False, layer_scale_init_value=0.1,
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def convert_internvl_state(hf_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face InternVL state dict to visorlib's module names.

    Args:
        hf_state: Tensors keyed in either layout above.
        tied: Whether the LM head is the embedding matrix (a stored ``lm_head`` is then dropped).
    """
    return rename_keys(hf_state, HF_INTERNVL_KEYS, ignored=(TIED_LM_HEAD,) if tied else (),
                       source="InternVL checkpoint")


def _side(value: Any, source: str, key: str) -> int:
    """A square size from an int or an ``[h, w]`` pair."""
    sides = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ConfigError(f"{source}: vision_config.{key} {value!r} is not square (visorlib's InternVL tiles are)")
    return int(sides[0])


def config_from_hf(hf: dict[str, Any], source: str = "config.json", name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face InternVL ``config.json``.

    Missing keys take transformers' defaults. The image processing settings are not in
    ``config.json``; the released ``-hf`` checkpoints' values are used (ImageNet mean/std, 448-px
    tiles, at most 12 tiles plus a thumbnail).

    Raises:
        ConfigError: for model types or options visorlib does not implement (named in the message).
    """
    require_value(source, "model_type", hf.get("model_type"), ("internvl",))
    text = hf.get("text_config") or {}
    require_value(source, "text_config.model_type", text.get("model_type", "qwen2"), ("qwen2",))
    decoder = qwen2_decoder_config(hf, source, TEXT_DEFAULTS)
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    require_value(source, "vision_feature_layer", hf.get("vision_feature_layer", -1), (-1,))
    require_value(source, "vision_feature_select_strategy", hf.get("vision_feature_select_strategy", "default"),
                  ("default",))
    require_value(source, "projector_hidden_act", hf.get("projector_hidden_act", "gelu"), ("gelu",))
    for key, allowed in (("hidden_act", "gelu"), ("norm_type", "layer_norm"), ("attention_bias", True),
                         ("use_absolute_position_embeddings", True), ("use_mean_pooling", True),
                         ("use_mask_token", False)):
        require_value(source, f"vision_config.{key}", vision[key], (allowed,))
    ratio = float(hf.get("downsample_ratio", 0.5))
    fold = round(1 / ratio)
    if fold * ratio != 1:
        raise ConfigError(f"{source}: downsample_ratio {ratio} must be 1/k for a whole number k")
    patch, side = _side(vision["patch_size"], source, "patch_size"), _side(vision["image_size"], source, "image_size")
    vision_cfg = VisionConfig(
        kind="internvit",
        image_size=side,
        patch_size=patch * fold,
        hidden_size=vision["hidden_size"] * fold * fold,
        intermediate_size=vision["intermediate_size"],
        num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        layer_norm_eps=float(vision["layer_norm_eps"]),
        in_channels=vision["num_channels"],
        hidden_act="gelu",
        downsample_ratio=ratio,
        use_qk_norm=bool(vision["use_qk_norm"]),
        layer_scale_init=float(vision["layer_scale_init_value"]),
    )
    tokens = TokensConfig(image_token_id=hf.get("image_token_id", 151667), video_token_id=151675,
                          eos_token_ids=[151645], pad_token_id=151643, chat_template="qwen2")
    processing = ImageProcessingConfig(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                       vision_aspect_ratio="anyres_max_12")
    return ModelConfig(name=name or hf.get("_name_or_path") or "internvl", family="internvl",
                       description="converted from a Hugging Face InternVL checkpoint", vision=vision_cfg,
                       decoder=decoder, use_image_newline=False, processing=processing, tokens=tokens)
