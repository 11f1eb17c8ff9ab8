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
  whose module names predate timm's (a flat ``network`` list instead of ``stages``). timm's own
  :func:`timm.models.fastvit.checkpoint_filter_fn` (written for Apple's MobileCLIP checkpoints)
  does most of that tower's renaming; :func:`apple_fastvit_key_map` adds the two folded
  convolutions it does not know.

Only re-parameterised towers exist in either layout (FastVLM ships ``inference_mode=True``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...config import ConfigError, ImageProcessingConfig, ModelConfig, TokensConfig, VisionConfig
from ...hub import CheckpointError
from ...modules.convert import TIED_LM_HEAD, qwen2_decoder_config, rename_keys, require_value
from ...registry import resolve_vision
from ..llava_onevision.convert import TEXT_DEFAULTS, convert_llava_onevision_state

# Apple layout, outside the vision tower: (pattern, replacement), applied in order.
APPLE_FASTVLM_KEYS: list[tuple[str, str]] = [
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.", "decoder."),
    (r"^lm_head\.", "decoder.lm_head."),
]
APPLE_TOWER_PREFIX = "model.vision_tower.vision_tower.model."

# What timm's checkpoint_filter_fn leaves for a re-parameterised tower (it was written for the
# training-time branches): the folded large-kernel conv of each downsampling, and the folded
# positional conv, which it files under ``blocks`` instead of ``pos_emb``. The last rule keeps
# the rest of timm's names and makes anything else an unrecognised key.
APPLE_FASTVIT_LEFTOVERS: list[tuple[str, str]] = [
    (r"\.lkb_reparam\.", ".reparam_conv."),
    (r"^(stages\.\d+\.)blocks\.reparam_conv\.", r"\1pos_emb.reparam_conv."),
    (r"^(stem|stages|final_conv)\.", r"\1."),
]
# Unused by FastVLM: MobileCLIP's image-text projection (``head.proj``).
APPLE_IGNORED_TOWER_PREFIX = "head."
# Training-time (un-folded) branches: FastVLM ships folded towers, and only those are built.
_UNFOLDED = re.compile(r"\.(rbr_conv|rbr_scale|rbr_skip|lkb_origin|pe)\.")


def apple_fastvit_key_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert Apple's FastViT keys (relative to the tower) to timm's ``FastVit`` names.

    Apple keeps one flat ``network`` list: a stage's blocks (``network.N.<block>.``), then the next
    stage's downsampling (``network.N.proj.``) and, for attention stages, its positional
    convolution (``network.N.reparam_conv.``). timm's filter regroups them under ``stages.<i>``
    (a stage starts at each downsampling) and renames the modules; the leftovers table above
    finishes the folded convolutions.

    Raises:
        CheckpointError: for an un-folded tower or keys a FastViT does not have.
    """
    from timm.models.fastvit import checkpoint_filter_fn  # here: importing timm costs seconds

    unfolded = sorted(key for key in state if _UNFOLDED.search(key))
    if unfolded:
        raise CheckpointError(f"Apple FastViT tower: {unfolded[0]!r} is a training-time branch; only "
                              "re-parameterised towers (inference_mode) are supported")
    # Dropped first: timm's filter would consult the model's classifier for the projection.
    kept = {key: value for key, value in state.items() if not key.startswith(APPLE_IGNORED_TOWER_PREFIX)}
    return rename_keys(checkpoint_filter_fn(kept, None), APPLE_FASTVIT_LEFTOVERS, source="Apple FastViT tower")


def convert_fastvlm_state(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename a transformers or Apple FastVLM state dict to visorlib's module names.

    Args:
        state: Tensors keyed in either layout (detected from the keys).
        tied: Whether the LM head shares the embedding matrix (a stored ``lm_head`` is then dropped).

    Raises:
        CheckpointError: for keys neither layout has.
    """
    if not any(k.startswith(("model.mm_projector.", APPLE_TOWER_PREFIX)) for k in state):
        return convert_llava_onevision_state(state, tied, vision_map=dict)
    tower = {key[len(APPLE_TOWER_PREFIX):]: value for key, value in state.items() if key.startswith(APPLE_TOWER_PREFIX)}
    rest = {key: value for key, value in state.items() if not key.startswith(APPLE_TOWER_PREFIX)}
    out = rename_keys(rest, APPLE_FASTVLM_KEYS, ignored=(TIED_LM_HEAD,) if tied else (), source="Apple FastVLM checkpoint")
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
    require_value(source, "model_type", model_type, ("fast_vlm", "llava_qwen2"))
    if model_type == "fast_vlm":
        text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
        require_value(source, "text_config.model_type", text.get("model_type", "qwen2"), ("qwen2",))
        require_value(source, "vision_config.model_type", vision.get("model_type", "timm_wrapper"), ("timm_wrapper",))
        for key, expected in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "full"),
                              ("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)):
            require_value(source, key, hf.get(key, expected), (expected,))
        timm_kwargs = dict(vision.get("model_args") or {})
        # Missing means timm's default, the training-time (un-folded) network.
        require_value(source, "vision_config.model_args.inference_mode", timm_kwargs.pop("inference_mode", False), (True,))
        timm_model, feature_width = vision.get("architecture", "fastvit_mci3"), vision.get("hidden_size")
        image_token = hf.get("image_token_index", hf.get("image_token_id", TokensConfig().image_token_id))
        default_size = 1024
    else:
        tower = re.fullmatch(r"mobileclip_l_(\d+)", str(hf.get("mm_vision_tower")))
        if tower is None:
            raise ConfigError(f"{source}: mm_vision_tower {hf.get('mm_vision_tower')!r} is not FastVLM's (mobileclip_l_<px>)")
        for key, expected in (("mm_projector_type", "mlp2x_gelu"), ("image_aspect_ratio", "pad"),
                              ("mm_patch_merge_type", "flat")):
            require_value(source, key, hf.get(key, expected), (expected,))
        timm_model, timm_kwargs, feature_width = "fastvit_mci3", {}, hf.get("mm_hidden_size")
        image_token = hf.get("image_token_index", TokensConfig().image_token_id)
        default_size = int(tower.group(1))
    # Both layouts hold Qwen2-0.5B: nested in text_config (transformers) or flat (Apple).
    decoder = qwen2_decoder_config(hf, source, TEXT_DEFAULTS)
    folder = Path(source).parent
    image_size, processing = _image_processing(folder, default_size) if folder.is_dir() else (
        default_size, ImageProcessingConfig(image_mean=[0.0] * 3, image_std=[1.0] * 3, aspect_mode="pad"))
    extra = {} if feature_width is None else {"hidden_size": feature_width}  # checked against timm's
    try:
        vision_cfg = resolve_vision(VisionConfig(kind="fastvit", image_size=image_size, timm_model=timm_model,
                                                 timm_kwargs=timm_kwargs, **extra))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return ModelConfig(name=name or hf.get("_name_or_path") or "fastvlm", family="fast_vlm",
                       description="converted from a FastVLM checkpoint", vision=vision_cfg, decoder=decoder,
                       projector_act="gelu", use_image_newline=False, processing=processing,
                       tokens=TokensConfig(image_token_id=image_token))
