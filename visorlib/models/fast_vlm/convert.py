"""FastVLM checkpoints -> visorlib: configs and state-dict key maps.

Two on-disk layouts load:

* **transformers** (``model_type: fast_vlm``, e.g. ``KamilaMila/FastVLM-0.5B``): LLaVA-OneVision's
  layout with a ``TimmWrapperModel`` tower: ``model.language_model.*``, ``lm_head.*``,
  ``model.multi_modal_projector.linear_{1,2}.*``, ``model.vision_tower.timm_model.<timm FastViT>``.
  visorlib's tower keeps timm's names under ``timm_model.``, so only the prefixes change
  (:func:`visorlib.models.llava_onevision.convert.convert_llava_onevision_state` with an identity tower map).
* **Apple's original** (``model_type: llava_qwen2``, ``apple/FastVLM-0.5B``): ``model.embed_tokens``,
  ``model.layers``, ``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}`` (the ``mlp2x_gelu``
  Sequential: Linear, GELU, Linear) and ``model.vision_tower.vision_tower.model.<MobileCLIP FastViT>``,
  whose module names predate timm's (a flat ``network`` list instead of ``stages``). The tables
  below are every rename; :func:`apple_fastvit_key_map` applies them.

Only re-parameterised towers exist in either layout (FastVLM ships ``inference_mode=True``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...config import ConfigError, ImageProcessingConfig, ModelConfig, TokensConfig, VisionConfig
from ...registry import resolve_vision
from ..llava_onevision.convert import convert_llava_onevision_state, decoder_config_from_hf

# Apple layout, outside the vision tower: (pattern, replacement), first match wins.
APPLE_FASTVLM_KEYS: list[tuple[str, str]] = [
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.model\.", "vision_tower.timm_model."),
    (r"^model\.", "decoder."),
    (r"^lm_head\.", "decoder.lm_head."),
]
APPLE_TOWER_PREFIX = "model.vision_tower.vision_tower.model."

# Apple's MobileCLIP FastViT -> timm FastViT module names, applied in order to tower-relative keys
# (after the network index has become a stage, see apple_fastvit_key_map).
APPLE_FASTVIT_RENAMES: list[tuple[str, str]] = [
    (r"^patch_embed\.", "stem."),
    (r"^conv_exp\.", "final_conv."),
    (r"\.se\.reduce\.", ".se.fc1."),
    (r"\.se\.expand\.", ".se.fc2."),
    (r"\.convffn\.", ".mlp."),
    (r"\.lkb_reparam\.", ".reparam_conv."),
    (r"\.layer_scale(_[12])?$", r".layer_scale\1.gamma"),
]
# Unused by FastVLM: MobileCLIP's image-text projection (``head.proj``).
APPLE_IGNORED_TOWER_KEYS = re.compile(r"^head\.")
_NETWORK = re.compile(r"^network\.(\d+)\.(\d+\.|proj\.|reparam_conv\.)")


def apple_fastvit_key_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert Apple's FastViT keys (relative to the tower) to timm's ``FastVit`` names.

    Apple keeps one flat ``network`` list: a stage's blocks (``network.N.<block>.``), then the next
    stage's downsampling (``network.N.proj.``) and, for attention stages, its positional
    convolution (``network.N.reparam_conv.``). timm groups each stage's downsampling, positional
    convolution and blocks under ``stages.<i>``; a new stage starts at the first non-block entry
    after a run of blocks.
    """
    kinds: dict[int, str] = {}
    for key in state:
        match = _NETWORK.match(key)
        if match:
            kinds[int(match.group(1))] = "blocks" if match.group(2)[0].isdigit() else match.group(2)[:-1]
        elif key.startswith("network."):
            raise KeyError(f"unrecognised FastViT key {key!r} (only re-parameterised towers are supported)")
    stage_of, stage, previous = {}, 0, None
    for index in sorted(kinds):
        if kinds[index] != "blocks" and previous == "blocks":
            stage += 1
        stage_of[index], previous = stage, kinds[index]
    where = {"blocks": "blocks.", "proj": "downsample.proj.", "reparam_conv": "pos_emb.reparam_conv."}
    out = {}
    for key, value in state.items():
        if APPLE_IGNORED_TOWER_KEYS.match(key):
            continue
        match = _NETWORK.match(key)
        if match:
            index, rest = int(match.group(1)), key[match.end(1) + 1:]
            kind = kinds[index]
            if kind != "blocks":
                rest = rest[len(kind) + 1:]
            key = f"stages.{stage_of[index]}.{where[kind]}{rest}"
        for pattern, repl in APPLE_FASTVIT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def convert_fastvlm_state(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename a transformers or Apple FastVLM state dict to visorlib's module names.

    Args:
        state: Tensors keyed in either layout (detected from the keys).
        tied: Whether the LM head shares the embedding matrix (a stored ``lm_head`` is then dropped).
    """
    if not any(k.startswith(("model.mm_projector.", APPLE_TOWER_PREFIX)) for k in state):
        return convert_llava_onevision_state(state, tied, vision_map=dict)
    out, tower = {}, {}
    for key, value in state.items():
        if key.startswith(APPLE_TOWER_PREFIX):
            tower[key[len(APPLE_TOWER_PREFIX):]] = value
            continue
        for pattern, repl in APPLE_FASTVLM_KEYS:
            new = re.sub(pattern, repl, key)
            if new != key:
                break
        if not (tied and new == "decoder.lm_head.weight"):
            out[new] = value
    out.update({"vision_tower.timm_model." + k: v for k, v in apple_fastvit_key_map(tower).items()})
    return out


def _image_processing(folder: Path, default_size: int) -> tuple[int, ImageProcessingConfig]:
    """Tile side, mean and std from the checkpoint's image-processor file, if it has one.

    transformers 5 writes ``processor_config.json`` (the image processor nested inside), older
    versions ``preprocessor_config.json``; FastVLM's is a ``CLIPImageProcessor`` with a 1024-px
    crop, mean 0 and std 1 (pixels are only divided by 255), which are also the defaults.
    """
    proc: dict[str, Any] = {}
    for name, nested in (("processor_config.json", True), ("preprocessor_config.json", False)):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text())
            proc = data.get("image_processor", {}) if nested else data
            if proc:
                break
    crop = proc.get("crop_size") or {}
    size = crop.get("height", proc.get("size", {}).get("shortest_edge", default_size))
    processing = ImageProcessingConfig(
        image_mean=[float(v) for v in proc.get("image_mean", [0.0, 0.0, 0.0])],
        image_std=[float(v) for v in proc.get("image_std", [1.0, 1.0, 1.0])],
        aspect_mode="pad",
    )
    return int(size), processing


def fastvlm_config_from_hf(hf: dict[str, Any], source: str = "config.json", name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a FastVLM ``config.json`` (transformers or Apple's).

    The tile side and normalisation come from the image-processor file next to ``source`` when
    there is one (else 1024 px, mean 0, std 1).

    Raises:
        ConfigError: for options visorlib does not implement (named in the message).
    """
    model_type = hf.get("model_type")
    tied = bool(hf.get("tie_word_embeddings") or (hf.get("text_config") or {}).get("tie_word_embeddings"))
    if model_type == "fast_vlm":
        text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
        if text.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(f"{source}: text_config.model_type {text.get('model_type')!r} is not supported (qwen2 only)")
        if vision.get("model_type", "timm_wrapper") != "timm_wrapper":
            raise ConfigError(f"{source}: vision_config.model_type {vision.get('model_type')!r} is not supported")
        for key, expected in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "full"),
                              ("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)):
            if hf.get(key, expected) != expected:
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (only {expected!r})")
        timm_kwargs = dict(vision.get("model_args") or {})
        if not timm_kwargs.pop("inference_mode", False):
            raise ConfigError(f"{source}: vision_config.model_args must set inference_mode: true (re-parameterised)")
        timm_model, feature_width = vision.get("architecture", "fastvit_mci3"), vision.get("hidden_size")
        decoder = decoder_config_from_hf(text, tied, source)
        image_token = hf.get("image_token_index", hf.get("image_token_id", TokensConfig().image_token_id))
        default_size = 1024
    elif model_type == "llava_qwen2":
        tower = re.fullmatch(r"mobileclip_l_(\d+)", str(hf.get("mm_vision_tower")))
        if tower is None:
            raise ConfigError(f"{source}: mm_vision_tower {hf.get('mm_vision_tower')!r} is not FastVLM's (mobileclip_l_<px>)")
        for key, expected in (("mm_projector_type", "mlp2x_gelu"), ("image_aspect_ratio", "pad"),
                              ("mm_patch_merge_type", "flat")):
            if hf.get(key, expected) != expected:
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (only {expected!r})")
        timm_model, timm_kwargs, feature_width = "fastvit_mci3", {}, hf.get("mm_hidden_size")
        decoder = decoder_config_from_hf(hf, tied, source)
        image_token = hf.get("image_token_index", TokensConfig().image_token_id)
        default_size = int(tower.group(1))
    else:
        raise ConfigError(f"{source}: model_type {model_type!r} is not FastVLM ('fast_vlm' or 'llava_qwen2')")
    folder = Path(source).parent
    image_size, processing = _image_processing(folder, default_size) if folder.is_dir() else (
        default_size, ImageProcessingConfig(image_mean=[0.0] * 3, image_std=[1.0] * 3, aspect_mode="pad"))
    extra = {} if feature_width is None else {"hidden_size": feature_width}  # checked against timm's
    try:
        vision_cfg = resolve_vision(VisionConfig(kind="fastvit", image_size=image_size, timm_model=timm_model,
                                                 timm_kwargs=timm_kwargs, **extra))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return ModelConfig(
        name=name or hf.get("_name_or_path") or "fastvlm",
        family="fast_vlm",
        description="converted from a FastVLM checkpoint",
        vision=vision_cfg,
        decoder=decoder,
        projector_act="gelu",
        use_image_newline=False,
        processing=processing,
        tokens=TokensConfig(image_token_id=image_token),
    )
