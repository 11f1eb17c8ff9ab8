"""Backbone adapters: vision towers and decoders, looked up by the ``kind`` a card names.

A new backbone registers a builder here; cards and recipes can
only reach what is registered, never an arbitrary import path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from torch import nn

from ..config import ConfigError, DecoderConfig, VisionConfig

VISION_TOWERS: dict[str, Callable[[VisionConfig], nn.Module]] = {}
DECODERS: dict[str, Callable[[DecoderConfig], nn.Module]] = {}
TIMM_FIELDS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {}


def register_vision_tower(kind: str, timm_fields: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None):
    """Decorator registering a vision-tower builder under ``kind``.

    Args:
        kind: The ``vision.kind`` that selects the builder.
        timm_fields: For towers that can come from a timm architecture (``vision.timm_model``):
            ``(timm_model, timm_kwargs) -> {VisionConfig field: value}``, the fields that
            architecture determines.
    """

    def wrap(builder):
        VISION_TOWERS[kind] = builder
        if timm_fields is not None:
            TIMM_FIELDS[kind] = timm_fields
        return builder

    return wrap


def timm_tower_fields(kind: str, timm_model: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The :class:`VisionConfig` fields a timm architecture determines for a ``kind`` of tower."""
    if kind not in TIMM_FIELDS:
        raise ConfigError(
            f"vision kind {kind!r} cannot be built from a timm architecture (vision.timm_model); "
            f"kinds that can: {', '.join(sorted(TIMM_FIELDS))}"
        )
    return dict(_cached_fields(kind, timm_model, json.dumps(timm_kwargs, sort_keys=True)))


@lru_cache(maxsize=64)
def _cached_fields(kind: str, timm_model: str, kwargs_json: str) -> tuple[tuple[str, Any], ...]:
    # Configs are parsed often (every override makes a new one); building even a meta-device
    # model each time would add up, so the answer is kept per architecture.
    return tuple(TIMM_FIELDS[kind](timm_model, json.loads(kwargs_json)).items())


def register_decoder(kind: str):
    """Decorator registering a decoder builder under ``kind``."""

    def wrap(builder):
        DECODERS[kind] = builder
        return builder

    return wrap


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """The vision tower a card asks for."""
    if cfg.kind not in VISION_TOWERS:
        raise ConfigError(f"unknown vision tower kind {cfg.kind!r} (registered: {', '.join(sorted(VISION_TOWERS))})")
    return VISION_TOWERS[cfg.kind](cfg)


def build_decoder(cfg: DecoderConfig) -> nn.Module:
    """The decoder a card asks for."""
    if cfg.kind not in DECODERS:
        raise ConfigError(f"unknown decoder kind {cfg.kind!r} (registered: {', '.join(sorted(DECODERS))})")
    return DECODERS[cfg.kind](cfg)


def _siglip_timm_fields(timm_model: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    from .siglip import siglip_fields_from_timm

    return siglip_fields_from_timm(timm_model, timm_kwargs)


@register_vision_tower("siglip", timm_fields=_siglip_timm_fields)
def _siglip(cfg: VisionConfig) -> nn.Module:
    from .siglip import SiglipVisionTower

    return SiglipVisionTower(cfg)


def _fastvit_timm_fields(timm_model: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    from .fastvit import fastvit_fields_from_timm

    return fastvit_fields_from_timm(timm_model, timm_kwargs)


@register_vision_tower("fastvit", timm_fields=_fastvit_timm_fields)
def _fastvit(cfg: VisionConfig) -> nn.Module:
    from .fastvit import FastVitTower

    return FastVitTower(cfg)


@register_vision_tower("qwen2_vl")
def _qwen2_vl(cfg: VisionConfig) -> nn.Module:
    from .qwen2_vl import Qwen2VisionTower

    return Qwen2VisionTower(cfg)


@register_decoder("qwen2")
def _qwen2(cfg: DecoderConfig) -> nn.Module:
    from .qwen2 import Qwen2Decoder

    return Qwen2Decoder(cfg)
