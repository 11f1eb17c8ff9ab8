"""FastVLM: a FastViT tower on LLaVA-OneVision's assembly (``family: fast_vlm``).

FastVLM is LLaVA-OneVision with a FastViT tower (timm's, :mod:`.fastvit`), one padded tile per
image and no ``image_newline`` (card fields), so it reuses the ``llava_onevision`` model and
processor; what differs is here: the tower adapter, the Hugging Face converters (transformers'
``fast_vlm`` and Apple's original ``llava_qwen2`` layouts, :mod:`.convert`) and the test size.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...registry import Family, register_family
from ..llava_onevision import (
    LlavaOnevision,
    LlavaOnevisionProcessor,
    projector_flops,
    reduced_image_tokens,
    tile_geometry,
)
from .convert import convert_fastvlm_state, fastvlm_config_from_hf
from .fastvit import FastVitTower, fastvit_tower_flops


def tiny(cfg: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """FastViT's stage layout (5 stages, attention in the last two, 64x downsampling) at widths
    8..128 and one block a stage: 128-px tiles give 2x2 tokens of width 256."""
    return {**overrides, "vision": {"image_size": 128, "patch_size": 64, "hidden_size": 256, "num_layers": 5,
                                    "timm_kwargs": {"layers": [1] * 5, "embed_dims": [8, 16, 32, 64, 128]}}}



FAMILY = register_family(Family(
    name="fast_vlm",
    model=LlavaOnevision,
    processor_class=LlavaOnevisionProcessor,
    hf_model_types=("fast_vlm", "llava_qwen2"),
    config_from_hf=fastvlm_config_from_hf,
    convert_state=convert_fastvlm_state,
    tower_flops=fastvit_tower_flops,
    projector_flops=projector_flops,
    geometry=tile_geometry,
    pre_llm_tokens=reduced_image_tokens,
    tiny=tiny,
))

__all__ = ["FAMILY", "FastVitTower"]
