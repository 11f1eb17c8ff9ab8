"""Model families: how a card's ``family`` is assembled, converted from Hugging Face and fed.

A family bundles the model class, its processor, the Hugging Face ``model_type`` values it can
load, and the two converters (``config.json`` -> :class:`ModelConfig`, state dict -> visorlib keys).
Adding a backbone means adding one :class:`Family` here (see ``docs/adding-a-backbone.md``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..layers import RMSNorm
from .llava_onevision import InputError, LlavaOnevision, ModelOutput
from .qwen2_vl import Qwen2VL


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


def _lazy(module: str, name: str) -> Callable:
    """``visorlib.<module>.<name>``, imported on the first call (importing visorlib stays light)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"visorlib.{module}"), name)(*args, **kwargs)

    return call


def _processor(name: str) -> Callable:
    """Factory ``(cfg, tokenizer_source_or_None)`` of the processor class ``visorlib.processing.<name>``."""

    def make(cfg, source=None, **kwargs):
        cls = getattr(importlib.import_module("visorlib.processing"), name)
        return cls(cfg) if source is None else cls.from_pretrained(cfg, source, **kwargs)

    return make


def _state(module: str, name: str) -> Callable:
    """``(hf_state, cfg) -> state`` from a converter ``(hf_state, tied) -> state`` in ``visorlib.<module>``."""
    convert = _lazy(module, name)
    return lambda state, cfg: convert(state, tied=cfg.decoder.tie_word_embeddings)


FAMILIES: dict[str, Family] = {
    "llava_onevision": Family(
        model=LlavaOnevision,
        processor=_processor("LlavaOnevisionProcessor"),
        hf_model_types=("llava_onevision",),
        config_from_hf=_lazy("convert", "config_from_hf"),
        convert_state=_state("convert", "convert_llava_onevision_state"),
    ),
    # FastVLM is LLaVA-OneVision's assembly with a FastViT tower, one padded tile per image and no
    # image_newline (card fields), so it reuses the model and processor; only the converters differ.
    "fast_vlm": Family(
        model=LlavaOnevision,
        processor=_processor("LlavaOnevisionProcessor"),
        hf_model_types=("fast_vlm", "llava_qwen2"),
        config_from_hf=_lazy("convert_fastvlm", "fastvlm_config_from_hf"),
        convert_state=_state("convert_fastvlm", "convert_fastvlm_state"),
    ),
    "qwen2_vl": Family(
        model=Qwen2VL, processor=_processor("Qwen2VLProcessor"), hf_model_types=("qwen2_vl",),
        config_from_hf=_lazy("convert_qwen2_vl", "config_from_hf"),
        convert_state=_state("convert_qwen2_vl", "convert_qwen2_vl_state"),
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


__all__ = ["FAMILIES", "Family", "InputError", "LlavaOnevision", "ModelOutput", "Qwen2VL", "family_for_hf", "family_of",
           "init_weights", "model_class"]
