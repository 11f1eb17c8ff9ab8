"""Hugging Face Qwen2-VL -> visorlib: the ``config.json`` reader and the state-dict key map.

Two on-disk layouts exist and both load (plus transformers 5's in-memory names):

* the Hub checkpoints (``Qwen/Qwen2-VL-*``, written by transformers 4.4x) and what transformers
  5.23's ``save_pretrained`` writes: ``model.*`` (the language model), ``visual.*`` (tower and
  merger), ``lm_head.*`` (absent when the head is tied);
* transformers >= 4.52 in memory (and some saves of that era): ``model.language_model.*``,
  ``model.visual.*``, ``lm_head.*``.

The Hub ``config.json`` files keep the language model's keys at the top level with M-RoPE in
``rope_scaling: {type: mrope, mrope_section: [16, 24, 24]}``; newer ones nest them in ``text_config``
with ``rope_parameters``. Both are read.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import ConfigError, ImageProcessingConfig, ModelConfig, TokensConfig, VisionConfig
from ...modules.convert import TIED_LM_HEAD, qwen2_decoder_config, rename_keys, require_value

# (pattern, replacement), applied in order to every key. The first two fold the in-memory names
# into the on-disk ones, which the rest map to visorlib's modules.
HF_QWEN2_VL_KEYS: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
    (r"^model\.", "decoder."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^visual\.patch_embed\.proj\.", "vision_tower.patch_embed."),
    (r"^visual\.merger\.ln_q\.", "projector.norm."),
    (r"^visual\.merger\.mlp\.0\.", "projector.linear_1."),
    (r"^visual\.merger\.mlp\.2\.", "projector.linear_2."),
    (r"^visual\.", "vision_tower."),
]

# Qwen2VLTextConfig's values for keys a config.json omits (but one KV head per query head when
# num_key_value_heads is missing, as visorlib always read it).
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
    rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=32768, mrope_section=[16, 24, 24],
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def convert_qwen2_vl_state(hf_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face Qwen2-VL state dict to visorlib's module names.

    Args:
        hf_state: Tensors keyed in either layout above.
        tied: Whether the LM head is the embedding matrix (an ``lm_head`` in the file is then
            dropped, as transformers does).

    The ``Conv3d`` patch embedding ``[C, 3, 2, 14, 14]`` becomes the equivalent linear map
    ``[C, 1176]`` (stride = kernel, so each output reads one flattened patch).
    """
    out = rename_keys(hf_state, HF_QWEN2_VL_KEYS, ignored=(TIED_LM_HEAD,) if tied else (), source="Qwen2-VL checkpoint")
    patch = out.get("vision_tower.patch_embed.weight")
    if patch is not None and patch.dim() == 5:
        out["vision_tower.patch_embed.weight"] = patch.reshape(patch.shape[0], -1)
    return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json", name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face Qwen2-VL ``config.json``.

    Missing keys take transformers' defaults. The image processing settings are not in
    ``config.json``; the released checkpoints' values are used (CLIP mean/std, 4 to 16384
    visual tokens an image: ``min_pixels`` 3136, ``max_pixels`` 12845056).

    Raises:
        ConfigError: for model types or options visorlib does not implement (named in the message).
    """
    require_value(source, "model_type", hf.get("model_type"), ("qwen2_vl",))
    decoder = qwen2_decoder_config(hf, source, TEXT_DEFAULTS, mrope=True)
    vision = hf.get("vision_config") or {}
    require_value(source, "vision_config.hidden_act", vision.get("hidden_act", "quick_gelu"), ("quick_gelu",))
    vision_rope = vision.get("rope_parameters") or {}
    require_value(source, "vision_config.rope_parameters.rope_theta", float(vision_rope.get("rope_theta", 10000.0)),
                  (10000.0,))
    hidden = decoder.hidden_size
    embed_dim = vision.get("embed_dim", 1280)
    if vision.get("hidden_size", hidden) != hidden:
        raise ConfigError(f"{source}: vision_config.hidden_size {vision['hidden_size']} must equal the decoder width {hidden}")
    patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)
    vision_cfg = VisionConfig(
        kind="qwen2_vl",
        image_size=patch * merge,
        patch_size=patch,
        hidden_size=embed_dim,
        intermediate_size=int(embed_dim * vision.get("mlp_ratio", 4)),
        num_layers=vision.get("depth", 32),
        num_heads=vision.get("num_heads", 16),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=merge,
        in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        hidden_act="quick_gelu",
    )
    tokens, processing = released_tokens_and_processing(hf)
    return ModelConfig(name=name or hf.get("_name_or_path") or "qwen2-vl", family="qwen2_vl",
                       description="converted from a Hugging Face Qwen2-VL checkpoint", vision=vision_cfg,
                       decoder=decoder, use_image_newline=False, processing=processing, tokens=tokens)


def released_tokens_and_processing(hf: dict[str, Any]) -> tuple[TokensConfig, ImageProcessingConfig]:
    """The special tokens and the image processing of the released Qwen2-VL / Qwen2.5-VL checkpoints.

    ``config.json`` holds only the placeholder ids; the rest (end-of-turn ids, CLIP mean/std, 4 to
    16384 visual tokens an image) is the same in every released checkpoint of both families.
    """
    tokens = TokensConfig(
        image_token_id=hf.get("image_token_id", 151655),
        video_token_id=hf.get("video_token_id", 151656),
        eos_token_ids=[151645, 151643],
        pad_token_id=151643,
        chat_template="qwen2_vl",
    )
    processing = ImageProcessingConfig(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), min_pixels=56 * 56,
                                       max_pixels=28 * 28 * 16384)
    return tokens, processing
