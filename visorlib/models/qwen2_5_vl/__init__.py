"""Qwen2.5-VL: a windowed ViT -> 2x2 merger -> Qwen2 decoder with M-RoPE (``family: qwen2_5_vl``).

Here: the windowed vision tower and RMSNorm merger (:mod:`.vision`), the model with time-aligned
video positions (:mod:`.model`, a subclass of Qwen2-VL's), the processor (:mod:`.processor`:
Qwen2-VL's plus ``second_per_grid_ts``) and the config reader (:mod:`.convert`; the key map is
Qwen2-VL's). The decoder is the shared Qwen2 decoder. As for Qwen2-VL, VISOR-TR token packing and
pre-LLM token reduction are not available: images have no fixed tile grid.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...registry import Family, register_family
from ..qwen2_vl import geometry
from .convert import config_from_hf, convert_qwen2_5_vl_state
from .model import Qwen25VL
from .processor import Qwen25VLProcessor
from .vision import Qwen25VisionTower, RMSPatchMerger, merger_flops, tower_flops, window_order


def tiny(cfg: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL's test size (12-px units, 4 to 64 visual tokens an image) with 24-px windows (2x2
    merged tokens, so a 4x6-token image has 6 windows) and block 1 of 2 attending the whole frame."""
    return {**overrides, "vision": {**overrides["vision"], "image_size": 12, "window_size": 24,
                                    "fullatt_block_indexes": [1]},
            "processing": {"min_pixels": 4 * 12**2, "max_pixels": 64 * 12**2}}


FAMILY = register_family(Family(
    name="qwen2_5_vl",
    model=Qwen25VL,
    processor_class=Qwen25VLProcessor,
    hf_model_types=("qwen2_5_vl",),
    config_from_hf=config_from_hf,
    convert_state=convert_qwen2_5_vl_state,
    tower_flops=tower_flops,
    projector_flops=lambda cfg, media: merger_flops(cfg.vision, media, cfg.decoder.hidden_size),
    geometry=lambda cfg: f"{geometry(cfg)}, {cfg.vision.window_size}px attention windows",
    tiny=tiny,
    token_packing=False,
))

__all__ = ["FAMILY", "Qwen25VL", "Qwen25VLProcessor", "Qwen25VisionTower", "RMSPatchMerger", "window_order"]
