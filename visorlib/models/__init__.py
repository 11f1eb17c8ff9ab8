"""Model assemblies, looked up by a card's ``family``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..layers import RMSNorm
from .llava_onevision import InputError, LlavaOnevision, ModelOutput

FAMILIES: dict[str, type[nn.Module]] = {"llava_onevision": LlavaOnevision}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The class that assembles ``cfg.family``."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"{cfg.name}: unknown model family {cfg.family!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[cfg.family]


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Random initialisation in the style of the reference models (normal(0, 0.02), unit norms).

    Used when a model is built without pretrained weights; the numbers only have to be sane, since
    real use loads a checkpoint.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.endswith("pos_embed"):
            nn.init.normal_(param, std=std)
        elif name.endswith("image_newline"):
            nn.init.normal_(param, std=1 / math.sqrt(param.shape[-1]))
    return model


__all__ = ["FAMILIES", "InputError", "LlavaOnevision", "ModelOutput", "init_weights", "model_class"]
