"""What a card's names resolve to: model families, vision towers and decoders.

A card names its ``family`` (``llava_onevision``), its ``vision.kind`` (``siglip``) and its
``decoder.kind`` (``qwen2``); cards and recipes can reach only what is registered here, never an
arbitrary import path. Each family folder under ``visorlib/models/`` registers itself next to
the code it registers (timm's habit)::

    @register_vision_tower("siglip", timm_fields=siglip_fields_from_timm)
    def build_siglip(cfg: VisionConfig) -> nn.Module: ...

    register_family(Family(name="llava_onevision", model=LlavaOnevision, ...))

This module knows no family by name; ``visorlib.models`` imports the family folders, which fill
the tables below.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import nn

from .config import FAMILY_LOADER, TINY_RULES, ConfigError, DecoderConfig, ModelConfig, VisionConfig

TowerFlops = Callable[[VisionConfig, "int | Sequence[int]"], float]


@dataclass(frozen=True)
class Family:
    """Everything visorlib needs to know about one model family.

    Attributes:
        name: The card's ``family`` value.
        model: The ``nn.Module`` class, built as ``model(cfg)``.
        processor_class: The input processor class (see :meth:`processor`).
        hf_model_types: ``model_type`` values of Hugging Face ``config.json`` files it loads.
        config_from_hf: ``(hf_config_dict, source, name) -> ModelConfig``.
        convert_state: ``(hf_state_dict, tied) -> visorlib state dict`` (``tied``: the card ties the LM head
            to the embeddings, so a stored ``lm_head`` is dropped); called through :meth:`convert`.
        tiny: ``(cfg, overrides) -> overrides``: how :meth:`~visorlib.config.ModelConfig.tiny` shrinks
            this family, given the generic test-size overrides (for towers with other geometry).
        tower_flops: ``(vision_cfg, tiles) -> FLOPs`` of the vision tower; what ``tiles`` counts is
            the family's unit (tiles, or patches per attention sequence).
        projector_flops: ``(cfg, tiles) -> FLOPs`` of the projector / merger.
        geometry: ``cfg -> str``, how the tower cuts images, for ``visorlib info``.
        token_packing: Whether VISOR-TR token packing (``visor.packing_ratio > 1``) is supported.
        pre_llm_tokens: ``(cfg, reducer, tiles) -> visual tokens`` of images under a pre-LLM token
            reduction method (the family's reduced layout); None: the family runs no pre-LLM method.
    """

    name: str
    model: type[nn.Module]
    processor_class: type
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[..., ModelConfig]
    convert_state: Callable[..., dict]
    tower_flops: TowerFlops
    projector_flops: Callable[[ModelConfig, Any], float]
    geometry: Callable[[ModelConfig], str]
    tiny: Callable[[ModelConfig, dict[str, Any]], dict[str, Any]] | None = None
    token_packing: bool = True
    pre_llm_tokens: Callable[..., int] | None = None

    def convert(self, state: dict, cfg: ModelConfig) -> dict:
        """A Hugging Face state dict of this family in visorlib's key layout, for ``cfg``."""
        return self.convert_state(state, tied=cfg.decoder.tie_word_embeddings)

    def processor(self, cfg: ModelConfig, source: Any = None, **kwargs: Any) -> Any:
        """The family's processor for ``cfg``, with the tokenizer of ``source`` (a folder or Hub id) when given."""
        if source is None:
            return self.processor_class(cfg)
        return self.processor_class.from_pretrained(cfg, source, **kwargs)


FAMILIES: dict[str, Family] = {}
VISION_TOWERS: dict[str, Callable[[VisionConfig], nn.Module]] = {}
DECODERS: dict[str, Callable[[DecoderConfig], nn.Module]] = {}
TIMM_FIELDS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {}


def load_builtin_families() -> None:
    """Load the built-in families, towers and decoders if they are not loaded yet.

    ``import visorlib`` loads nothing heavy (start-up time), so a caller that reaches the registry
    without going through the zoo (``visorlib.registry.family_of(cfg)``, ``ModelConfig.tiny()``)
    gets the tables filled here on first use; after that this is a dictionary look-up. The loader
    itself is installed by the package's ``__init__`` (:data:`visorlib.config.FAMILY_LOADER`), so
    that this module, below the families, never imports them.
    """
    for load in FAMILY_LOADER:
        load()


def register_family(family: Family) -> Family:
    """Register ``family`` under ``family.name`` (a second registration of a name is an error)."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    if family.tiny is not None:
        TINY_RULES[family.name] = family.tiny
    return family


def family_of(cfg: ModelConfig) -> Family:
    """The :class:`Family` that assembles ``cfg.family``."""
    load_builtin_families()
    if cfg.family not in FAMILIES:
        raise ConfigError(f"{cfg.name}: unknown model family {cfg.family!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[cfg.family]


def family_for_hf(model_type: str | None, source: str) -> Family:
    """The family that loads Hugging Face checkpoints of ``model_type``."""
    load_builtin_families()
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(known)})")


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


def register_decoder(kind: str):
    """Decorator registering a decoder builder under ``kind``."""

    def wrap(builder):
        DECODERS[kind] = builder
        return builder

    return wrap


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """The vision tower a card asks for."""
    load_builtin_families()
    if cfg.kind not in VISION_TOWERS:
        raise ConfigError(f"unknown vision tower kind {cfg.kind!r} (registered: {', '.join(sorted(VISION_TOWERS))})")
    return VISION_TOWERS[cfg.kind](cfg)


def build_decoder(cfg: DecoderConfig) -> nn.Module:
    """The decoder a card asks for."""
    load_builtin_families()
    if cfg.kind not in DECODERS:
        raise ConfigError(f"unknown decoder kind {cfg.kind!r} (registered: {', '.join(sorted(DECODERS))})")
    return DECODERS[cfg.kind](cfg)


def timm_tower_fields(kind: str, timm_model: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The :class:`VisionConfig` fields a timm architecture determines for a ``kind`` of tower."""
    load_builtin_families()
    if kind not in TIMM_FIELDS:
        raise ConfigError(
            f"vision kind {kind!r} cannot be built from a timm architecture (vision.timm_model); "
            f"kinds that can: {', '.join(sorted(TIMM_FIELDS))}"
        )
    return dict(_cached_fields(kind, timm_model, json.dumps(timm_kwargs, sort_keys=True)))


@lru_cache(maxsize=64)
def _cached_fields(kind: str, timm_model: str, kwargs_json: str) -> tuple[tuple[str, Any], ...]:
    # Configs are resolved often (every override makes a new one); building even a meta-device
    # model each time would add up, so the answer is kept per architecture.
    return tuple(TIMM_FIELDS[kind](timm_model, json.loads(kwargs_json)).items())


def resolve_vision(vision: VisionConfig) -> VisionConfig:
    """``vision`` with the fields its ``timm_model`` determines filled in (a copy; unchanged without one).

    A field left at its default is replaced; one set to a different value is a ``ConfigError``
    naming the key, since the tower timm builds would silently disagree with the card.
    """
    if vision.timm_model is None:
        return vision
    derived = timm_tower_fields(vision.kind, vision.timm_model, vision.timm_kwargs)
    defaults = {f.name: f.default for f in dataclasses.fields(vision)}
    for key, value in derived.items():
        current = getattr(vision, key)
        if current != value and current != defaults[key]:
            raise ConfigError(
                f"vision.{key}={current!r} contradicts timm architecture {vision.timm_model!r}, which has "
                f"{value!r}; leave the key out or set it to {value!r}"
            )
    return dataclasses.replace(vision, **derived)


def resolve(cfg: ModelConfig) -> ModelConfig:
    """A card made ready to build: family known, tower fields derived, family capabilities checked.

    :mod:`visorlib.config` only parses and range-checks data; everything that needs the
    registered code (timm architectures, which family supports what) happens here, in the build
    step. Idempotent and cheap (timm answers are cached).
    """
    family = family_of(cfg)
    vision = resolve_vision(cfg.vision)
    if cfg.visor is not None and cfg.visor.packing_ratio > 1 and not family.token_packing:
        raise ConfigError(f"{cfg.name}: visor.packing_ratio > 1 (VISOR-TR token packing) is not supported by the "
                          f"{family.name} family")
    return cfg if vision is cfg.vision else dataclasses.replace(cfg, vision=vision)
