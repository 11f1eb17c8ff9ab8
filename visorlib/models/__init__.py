"""Model families, one folder each: ``llava_onevision``, ``qwen2_vl``, ``qwen2_5_vl``, ``fast_vlm``, ``internvl``.

Importing this package registers every family (:func:`visorlib.registry.register_family`); a
family folder holds what only that family knows (towers, processor, converters, test sizes, tower
FLOPs, position scheme). What every family shares is in :mod:`visorlib.models.base` (the sequence
assembly and the output), :mod:`visorlib.modules` (decoder, attention, RoPE, cache) and
:mod:`visorlib.visor` (the method). Adding a family: ``docs/adding-a-backbone.md``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..modules.layers import RMSNorm
from ..registry import FAMILIES, Family, family_for_hf, family_of
from . import fast_vlm, internvl, llava_onevision, qwen2_5_vl, qwen2_vl
from .base import Embedded, InputError, ModelOutput, VisionLanguageModel
from .llava_onevision import LlavaOnevision
from .qwen2_vl import Qwen2VL


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The class that assembles ``cfg.family``."""
    return family_of(cfg).model


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
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()  # unit scale, zero shift and fresh running statistics (FastViT)
    for module in model.modules():
        # A tower whose random init must differ from the above re-initialises itself (FastViT: a
        # deep convolution stack whose activations would vanish at std 0.02).
        if hasattr(module, "reset_tower_parameters"):
            module.reset_tower_parameters()
    for name, param in model.named_parameters():
        if name.endswith("pos_embed"):
            nn.init.normal_(param, std=std)
        elif name.endswith("image_newline"):
            nn.init.normal_(param, std=1 / math.sqrt(param.shape[-1]))
    return model


def set_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that submodules whose parameters are all frozen stay in eval mode.

    A frozen part is a fixed feature extractor: FastViT's BatchNorm layers must not update their
    running statistics (buffers, saved with the checkpoint) while only other blocks learn, and its
    dropout, if any, stays off.
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params) and module.training:
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
    return model


__all__ = ["FAMILIES", "Embedded", "Family", "InputError", "LlavaOnevision", "ModelOutput", "Qwen2VL",
           "VisionLanguageModel", "fast_vlm", "family_for_hf", "family_of", "init_weights", "internvl", "llava_onevision",
           "model_class", "qwen2_5_vl", "qwen2_vl", "set_train_mode"]
