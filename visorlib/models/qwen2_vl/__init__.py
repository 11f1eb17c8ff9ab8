"""Qwen2-VL: a ViT at native resolution -> 2x2 patch merger -> Qwen2 decoder with M-RoPE (``family: qwen2_vl``).

Here: the vision tower and merger (:mod:`.vision`), the model and its M-RoPE position scheme
(:mod:`.model`), the smart-resize processor (:mod:`.processor`) and the Hugging Face converter
(:mod:`.convert`). The decoder is the shared Qwen2 decoder. VISOR-TR token packing is not
available: images have no fixed tile grid to fold.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...registry import Family, register_family
from .convert import config_from_hf, convert_qwen2_vl_state
from .model import Qwen2VL, mrope_positions
from .processor import Qwen2VLProcessor
from .vision import PatchMerger, Qwen2VisionTower, merger_flops, tower_flops


def tiny(cfg: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Dynamic resolution in units of 12 px (patch 6 x merge 2): 4 to 64 visual tokens an image."""
    return {**overrides, "vision": {**overrides["vision"], "image_size": 12},
            "processing": {"min_pixels": 4 * 12**2, "max_pixels": 64 * 12**2}}


def geometry(cfg: ModelConfig) -> str:
    v = cfg.vision
    return f"any resolution, {v.patch_size}px patches merged {v.spatial_merge_size}x{v.spatial_merge_size}"


FAMILY = register_family(Family(
    name="qwen2_vl",
    model=Qwen2VL,
    processor_class=Qwen2VLProcessor,
    hf_model_types=("qwen2_vl",),
    config_from_hf=config_from_hf,
    convert_state=convert_qwen2_vl_state,
    tower_flops=tower_flops,
    projector_flops=lambda cfg, patches: merger_flops(cfg.vision, patches, cfg.decoder.hidden_size),
    geometry=geometry,
    tiny=tiny,
    token_packing=False,
))

__all__ = ["FAMILY", "PatchMerger", "Qwen2VL", "Qwen2VLProcessor", "Qwen2VisionTower", "mrope_positions"]
