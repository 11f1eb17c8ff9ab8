"""Model families: how a card's ``family`` is assembled, converted from Hugging Face and fed.

A family bundles the model class, its processor, the Hugging Face ``model_type`` values it can
load, and the two converters (``config.json`` -> :class:`ModelConfig`, state dict -> visorlib keys).
Adding a backbone means adding one :class:`Family` here (see ``docs/adding-a-backbone.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..layers import RMSNorm
from .llava_onevision import InputError, LlavaOnevision, ModelOutput


@dataclass(frozen=True)
class Family:
    """Everything visorlib needs to know about one model family.

    Attributes:
        model: The ``nn.Module`` class, built as ``model(cfg)``.
        processor: Factory ``processor(cfg, tokenizer_source_or_None)`` of its input processor.
        hf_model_types: ``model_type`` values of Hugging Face ``config.json`` files it loads.
        config_from_hf: ``(hf_config_dict, source, name) -> ModelConfig``.
        convert_state: ``(hf_state_dict, cfg) -> visorlib state dict``.
    """

    model: type[nn.Module]
    processor: Callable
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable
    convert_state: Callable


def _llava_onevision_processor(cfg, source=None):
    from ..processing import LlavaOnevisionProcessor

    return LlavaOnevisionProcessor(cfg) if source is None else LlavaOnevisionProcessor.from_pretrained(cfg, source)


def _llava_onevision_state(state, cfg):
    from ..convert import convert_llava_onevision_state

    return convert_llava_onevision_state(state, tied=cfg.decoder.tie_word_embeddings)


def _llava_onevision_config(hf, source, name):
    from ..convert import config_from_hf

    return config_from_hf(hf, source, name)


FAMILIES: dict[str, Family] = {
    "llava_onevision": Family(
        model=LlavaOnevision,
        processor=_llava_onevision_processor,
        hf_model_types=("llava_onevision",),
        config_from_hf=_llava_onevision_config,
        convert_state=_llava_onevision_state,
    ),
}


def family_of(cfg: ModelConfig) -> Family:
    """The :class:`Family` that assembles ``cfg.family``."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"{cfg.name}: unknown model family {cfg.family!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[cfg.family]


def family_for_hf(model_type: str | None, source: str) -> Family:
    """The family that loads Hugging Face checkpoints of ``model_type``."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(known)})")


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
    for name, param in model.named_parameters():
        if name.endswith("pos_embed"):
            nn.init.normal_(param, std=std)
        elif name.endswith("image_newline"):
            nn.init.normal_(param, std=1 / math.sqrt(param.shape[-1]))
    return model


__all__ = ["FAMILIES", "Family", "InputError", "LlavaOnevision", "ModelOutput", "family_for_hf", "family_of",
           "init_weights", "model_class"]
