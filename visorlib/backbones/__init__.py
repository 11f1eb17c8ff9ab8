"""Backbone adapters: vision towers and decoders, looked up by the ``kind`` a card names.

A new backbone registers a builder here; cards and recipes can
only reach what is registered, never an arbitrary import path.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import ConfigError, DecoderConfig, VisionConfig

VISION_TOWERS: dict[str, Callable[[VisionConfig], nn.Module]] = {}
DECODERS: dict[str, Callable[[DecoderConfig], nn.Module]] = {}


def register_vision_tower(kind: str):
    """Decorator registering a vision-tower builder under ``kind``."""

    def wrap(builder):
        VISION_TOWERS[kind] = builder
        return builder

    return wrap


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


@register_vision_tower("siglip")
def _siglip(cfg: VisionConfig) -> nn.Module:
    from .siglip import SiglipVisionTower

    return SiglipVisionTower(cfg)


@register_decoder("qwen2")
def _qwen2(cfg: DecoderConfig) -> nn.Module:
    from .qwen2 import Qwen2Decoder

    return Qwen2Decoder(cfg)
