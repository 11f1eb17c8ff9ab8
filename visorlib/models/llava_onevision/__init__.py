"""LLaVA-OneVision: SigLIP tiles -> 2-layer MLP projector -> Qwen2 decoder (``family: llava_onevision``).

What only this family knows lives here: the SigLIP adapter over timm (:mod:`.siglip`), the anyres
model assembly (:mod:`.model`), its processor (:mod:`.processor`) and the Hugging Face converter
(:mod:`.convert`). The projector and tile geometry are shared with FastVLM, which reuses this model.
"""

from __future__ import annotations

from ...config import ModelConfig
from ...modules.counting import linear_flops
from ...registry import Family, register_family
from .convert import config_from_hf, convert_llava_onevision_state
from .model import LlavaOnevision, Projector
from .processor import LlavaOnevisionProcessor, reduced_image_tokens
from .siglip import siglip_tower_flops


def projector_flops(cfg: ModelConfig, tiles: int) -> float:
    """The two projector linears over every tile's tokens (after VISOR-TR packing, if any)."""
    tokens = tiles * cfg.feature_grid_size**2
    packing = cfg.visor is not None and cfg.visor.packing_ratio > 1
    width = cfg.vision.hidden_size * (4 if packing else 1)  # the packer folds 2x2 tokens into channels
    dim = cfg.decoder.hidden_size
    return linear_flops(tokens, width, dim) + linear_flops(tokens, dim, dim)


def tile_geometry(cfg: ModelConfig) -> str:
    """``384px tiles, 729 tokens/tile`` (for ``visorlib info``)."""
    return f"{cfg.vision.image_size}px tiles, {cfg.feature_grid_size ** 2} tokens/tile"



FAMILY = register_family(Family(
    name="llava_onevision",
    model=LlavaOnevision,
    processor_class=LlavaOnevisionProcessor,
    hf_model_types=("llava_onevision",),
    config_from_hf=config_from_hf,
    convert_state=convert_llava_onevision_state,
    tower_flops=siglip_tower_flops,
    projector_flops=projector_flops,
    geometry=tile_geometry,
    pre_llm_tokens=reduced_image_tokens,
))

__all__ = ["FAMILY", "LlavaOnevision", "LlavaOnevisionProcessor", "Projector", "SiglipVisionTower",
           "reduced_image_tokens"]


def __getattr__(name: str):
    """``SiglipVisionTower`` on first use: its module imports timm (seconds), see :mod:`.siglip`."""
    if name == "SiglipVisionTower":
        from .siglip_vit import SiglipVisionTower

        return SiglipVisionTower
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
