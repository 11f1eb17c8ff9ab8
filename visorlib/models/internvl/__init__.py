"""InternVL3: InternViT tiles -> pixel shuffle -> MLP projector -> Qwen2.5 decoder (``family: internvl``).

Here: the InternViT tower with the pixel shuffle and its FLOPs (:mod:`.vision`), the model
(:mod:`.model`), the dynamic-tiling processor (:mod:`.processor`) and the Hugging Face converter
(:mod:`.convert`, transformers' ``internvl`` layout). The decoder is the shared Qwen2 decoder
(1-D RoPE). Pre-LLM token reduction: ``pooling`` only (see :mod:`.model`); VISOR-TR packing: no.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...modules.counting import linear_flops
from ...registry import Family, register_family
from .convert import config_from_hf, convert_internvl_state
from .model import InternVL, InternVLProjector
from .processor import InternVLProcessor, reduced_image_tokens
from .vision import InternViTTower, internvit_tower_flops, pixel_shuffle


def tiny(cfg: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """48-px tiles of 6-px ViT patches (8x8), shuffled to 4x4 = 16 tokens a tile of width 4 x 32."""
    return {**overrides, "vision": {**overrides["vision"], "image_size": 48, "patch_size": 12, "hidden_size": 128}}


def projector_flops(cfg: ModelConfig, tiles: int) -> float:
    """LayerNorm (uncounted), then two linears over every tile's tokens."""
    tokens, width = tiles * cfg.vision.tokens_per_tile, cfg.decoder.hidden_size
    return linear_flops(tokens, cfg.vision.hidden_size, width) + linear_flops(tokens, width, width)


def geometry(cfg: ModelConfig) -> str:
    v = cfg.vision
    return (f"dynamic {v.image_size}px tiles (up to {cfg.processing.max_tiles} + thumbnail), "
            f"{v.tokens_per_tile} tokens/tile after the pixel shuffle")


FAMILY = register_family(Family(
    name="internvl",
    model=InternVL,
    processor_class=InternVLProcessor,
    hf_model_types=("internvl",),
    config_from_hf=config_from_hf,
    convert_state=convert_internvl_state,
    tower_flops=internvit_tower_flops,
    projector_flops=projector_flops,
    geometry=geometry,
    tiny=tiny,
    token_packing=False,
    pre_llm_tokens=reduced_image_tokens,
))

__all__ = ["FAMILY", "InternVL", "InternVLProcessor", "InternVLProjector", "InternViTTower", "pixel_shuffle"]
