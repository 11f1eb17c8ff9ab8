"""Token-reduction specs: a registry of named methods, each a small dataclass of its parameters.

A spec is what a user writes, per call or in a zoo card::

    {"method": "visionzip", "keep": 128}                  # 128 tokens per tile, paper split 104 + 24
    {"method": "fastv", "keep": 0.5, "layer": 2}          # drop half the visual tokens after layer 2
    [{"method": "pooling", "keep": 0.25}, {"method": "fastv"}]   # one pre-LLM, then one in-LLM method

``keep`` is the one knob every method has: a ``float`` in (0, 1] is a *share* of the visual tokens,
an ``int`` >= 1 a *count* (per tile for pre-LLM methods, at the end for in-LLM ones), so methods
compare at equal budgets. ``1.0`` keeps everything; ``1`` keeps one token. Every other parameter
defaults to the setting the VISOR paper used for LLaVA-OneVision (appendix L).

New methods register with :func:`register_reducer` (timm-style decorator); parsing is strict: an
unknown method, an unknown key or a value out of range raises :class:`ReductionSpecError` naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...config import ConfigError
from ...validation import InputError

PRE_LLM = "pre_llm"
IN_LLM = "in_llm"


class ReductionSpecError(InputError, ConfigError):
    """A bad ``token_reduction`` spec: an input error from a call, a config error from a card."""


REDUCERS: dict[str, type[Reducer]] = {}


def register_reducer(name: str) -> Callable[[type[Reducer]], type[Reducer]]:
    """Class decorator registering a :class:`Reducer` dataclass under ``name``."""

    def wrap(cls: type[Reducer]) -> type[Reducer]:
        if name in REDUCERS:
            raise ValueError(f"token-reduction method {name!r} is already registered")
        cls.name = name
        REDUCERS[name] = cls
        return cls

    return wrap


def list_reducers() -> list[str]:
    """Names of the registered token-reduction methods."""
    return sorted(REDUCERS)


def _check_keep(method: str, keep: Any) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ReductionSpecError(f"{method}: 'keep' must be a share (float in (0, 1]) or a count (int >= 1), "
                                 f"got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ReductionSpecError(f"{method}: 'keep' share {keep} is out of range (0, 1]; use an int for a count")
    if isinstance(keep, int) and keep < 1:
        raise ReductionSpecError(f"{method}: 'keep' count {keep} must be >= 1")


def resolve_keep(keep: int | float, available: int, what: str) -> int:
    """Number of tokens ``keep`` means out of ``available``.

    A share rounds to the nearest count and keeps at least one token; a count larger than what is
    there is an error (silently keeping everything would misreport the budget).
    """
    if isinstance(keep, float):
        return max(1, min(available, round(keep * available)))
    if keep > available:
        raise ReductionSpecError(f"'keep' count {keep} is larger than the {available} visual tokens of {what}")
    return keep


@dataclass(frozen=True)
class Reducer:
    """Base of every method's parameters. Subclasses are dataclasses with a ``keep`` field."""

    name: ClassVar[str] = ""
    where: ClassVar[str] = PRE_LLM
    #: Whether the method reads the vision tower's attention (refused on towers that do not expose it).
    needs_tower_attention: ClassVar[bool] = False

    keep: int | float = 1.0

    def __post_init__(self) -> None:
        _check_keep(self.name, self.keep)
        self.validate()

    def validate(self) -> None:
        """Method-specific range checks (raise :class:`ReductionSpecError`)."""

    def to_dict(self) -> dict[str, Any]:
        """The spec back as a plain dict (round-trips through :func:`parse_reduction`)."""
        out = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _share(method: str, key: str, value: Any, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReductionSpecError(f"{method}: {key!r} must be a number, got {value!r}")
    if not ((0.0 < value if low_open else 0.0 <= value) and value <= 1.0):
        raise ReductionSpecError(f"{method}: {key!r} = {value} is out of range {'(0' if low_open else '[0'}, 1]")


def _int(method: str, key: str, value: Any, low: int | None) -> None:
    """``value`` must be an int (>= ``low`` unless None; a tower layer may count from the end)."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ReductionSpecError(f"{method}: {key!r} must be an int{'' if low is None else f' >= {low}'}, "
                                 f"got {value!r}")


@register_reducer("visionzip")
@dataclass(frozen=True)
class VisionZip(Reducer):
    """VisionZip (Yang et al., 2024): dominant tokens by attention + contextual tokens merged by key similarity.

    Attributes:
        keep: Tokens kept per tile (paper: 128 of 729).
        dominant_ratio: Share of ``keep`` that are dominant tokens; the rest are merged contextual
            tokens (paper: 104 + 24, i.e. 104/128).
        layer: Tower block whose attention and keys score the tokens (-1: the last kept block,
            whose output are the features).
    """

    needs_tower_attention: ClassVar[bool] = True
    keep: int | float = 128
    dominant_ratio: float = 104 / 128
    layer: int = -1

    def validate(self) -> None:
        _share(self.name, "dominant_ratio", self.dominant_ratio, low_open=False)
        _int(self.name, "layer", self.layer, None)

    def split(self, kept: int) -> tuple[int, int]:
        """(dominant, contextual) counts for ``kept`` tokens per tile; at least one dominant token."""
        dominant = min(kept, max(1, round(kept * self.dominant_ratio)))
        return dominant, kept - dominant


@register_reducer("vispruner")
@dataclass(frozen=True)
class VisPruner(Reducer):
    """VisPruner (Zhang et al., ICCV 2025): important tokens by attention + diverse tokens by duplicate removal.

    Attributes:
        keep: Tokens kept per tile (paper: 128).
        important_ratio: Share of ``keep`` chosen by attention (paper: 96 of 128); the rest are the
            diverse tokens left after removing near-duplicates.
        step: Tokens removed per duplicate-removal round (the original code's 8).
        layer: Tower block whose attention scores importance (-1: the last kept block).
    """

    needs_tower_attention: ClassVar[bool] = True
    keep: int | float = 128
    important_ratio: float = 0.75
    step: int = 8
    layer: int = -1

    def validate(self) -> None:
        _share(self.name, "important_ratio", self.important_ratio, low_open=False)
        _int(self.name, "step", self.step, 1)
        _int(self.name, "layer", self.layer, None)

    def split(self, kept: int) -> tuple[int, int]:
        """(important, diverse) counts for ``kept`` tokens per tile."""
        important = min(kept, round(kept * self.important_ratio))
        return important, kept - important


@register_reducer("hired")
@dataclass(frozen=True)
class HiRED(Reducer):
    """HiRED (Arif et al., AAAI 2025): per-tile budgets from the whole image's attention, then top tokens per tile.

    Attributes:
        keep: Budget of the whole image: a share of all its tiles' tokens (paper: 0.2), or a count
            per tile on average (the image keeps ``keep * tiles`` tokens).
        alpha: Share of the budget given to the base (whole-image) tile, at most one tile's tokens
            (original code's default 0.5); the rest is shared among the other tiles.
        budget_layer: Tower block whose attention on the base tile sets the per-tile budgets (0).
        layer: Tower block whose attention picks the tokens within a tile (-1: the last kept block).
    """

    needs_tower_attention: ClassVar[bool] = True
    keep: int | float = 0.2
    alpha: float = 0.5
    budget_layer: int = 0
    layer: int = -1

    def validate(self) -> None:
        _share(self.name, "alpha", self.alpha, low_open=False)
        _int(self.name, "budget_layer", self.budget_layer, None)
        _int(self.name, "layer", self.layer, None)


@register_reducer("pooling")
@dataclass(frozen=True)
class Pooling(Reducer):
    """M3-style average pooling (Cai et al., ICLR 2025) of each tile's token grid.

    Attributes:
        keep: Share of tokens per tile (paper scales 1, 4, 8, 16x = 1.0, 0.25, 0.125, 0.0625; the
            paper reports 8x) or a count that is a perfect square (the pooled grid is square).
    """

    keep: int | float = 0.125


@register_reducer("fastv")
@dataclass(frozen=True)
class FastV(Reducer):
    """FastV (Chen et al., ECCV 2024): after layer K keep the visual tokens the last token attends to most.

    Attributes:
        keep: Visual tokens kept from layer ``layer`` on (share: 1 - R; the original's R = 50 %).
        layer: K: layers ``0..K-1`` see every visual token; the attention of layer K-1 (0-indexed)
            scores them and layers ``K..`` see only the kept ones (original: K = 2).
    """

    where: ClassVar[str] = IN_LLM
    keep: int | float = 0.5
    layer: int = 2

    def validate(self) -> None:
        _int(self.name, "layer", self.layer, 1)

    def check_layers(self, num_layers: int) -> None:
        """Refuse a pruning layer outside ``1..num_layers-1``."""
        if not 1 <= self.layer < num_layers:
            raise ReductionSpecError(f"fastv: 'layer' {self.layer} is out of range 1..{num_layers - 1} "
                                     f"for a {num_layers}-layer decoder")


# Paper, appendix L (LLaVA-OV 0.5B, 24 layers, "easy" setting): stages (1, 2-6, 7-12, 13-24), 1-indexed.
_PDROP_STARTS_24 = (0, 1, 6, 12)
_PDROP_RATIOS = (1.0, 0.3, 0.2, 0.1)


@register_reducer("pyramiddrop")
@dataclass(frozen=True)
class PyramidDrop(Reducer):
    """PyramidDrop (Xing et al., CVPR 2025): stages with shrinking visual sets, scored by the last instruction token.

    Attributes:
        keep: Visual tokens kept in the last stage (share of the visual tokens entering the LLM, or
            a count). Default: the last of ``ratios``.
        layers: First layer (0-indexed) of each stage. None: the paper's 24-layer stages
            (0, 1, 6, 12), rescaled proportionally for other depths.
        ratios: Share of the visual tokens kept in each stage, relative to the LLM's input
            (paper: 1.0, 0.3, 0.2, 0.1). When ``keep`` is given without ``ratios``, the default
            ratios after the first are scaled so that the last equals ``keep`` (capped at 1).
    """

    where: ClassVar[str] = IN_LLM
    keep: int | float = 0.1
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] = field(default=_PDROP_RATIOS)

    def validate(self) -> None:
        if not self.ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) for r in self.ratios):
            raise ReductionSpecError(f"pyramiddrop: 'ratios' must be a non-empty list of shares, got {self.ratios!r}")
        for i, r in enumerate(self.ratios):
            _share(self.name, f"ratios[{i}]", r)
        if any(b > a for a, b in zip(self.ratios, self.ratios[1:], strict=False)):
            raise ReductionSpecError(f"pyramiddrop: 'ratios' {list(self.ratios)} must not increase (a dropped token "
                                     "cannot come back)")
        if self.layers is None and len(self.ratios) != len(_PDROP_STARTS_24):
            raise ReductionSpecError(f"pyramiddrop: {len(self.ratios)} 'ratios' need their stage 'layers' (the default "
                                     f"stages are {len(_PDROP_STARTS_24)})")
        if self.layers is not None:
            if len(self.layers) != len(self.ratios):
                raise ReductionSpecError(f"pyramiddrop: {len(self.layers)} 'layers' but {len(self.ratios)} 'ratios'")
            for i, layer in enumerate(self.layers):
                _int(self.name, f"layers[{i}]", layer, 0)
            if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ReductionSpecError(f"pyramiddrop: 'layers' {list(self.layers)} must increase")

    def stages(self, num_layers: int, n_visual: int) -> list[tuple[int, int]]:
        """``(first_layer, kept_tokens)`` per stage for a sample with ``n_visual`` visual tokens.

        Raises:
            ReductionSpecError: A stage layer outside the decoder, or a count ``keep`` above ``n_visual``.
        """
        starts = self.layers
        if starts is None:
            starts = tuple(round(s * num_layers / 24) for s in _PDROP_STARTS_24)
        if starts[-1] >= num_layers:
            raise ReductionSpecError(f"pyramiddrop: stage layer {starts[-1]} is out of range for a "
                                     f"{num_layers}-layer decoder")
        if isinstance(self.keep, float):
            last = self.keep
        else:
            last = resolve_keep(self.keep, n_visual, "the sample") / n_visual if n_visual else 1.0
        ratios = list(self.ratios)
        if ratios[-1] != last:
            scale = last / ratios[-1]
            ratios = [ratios[0]] + [min(1.0, r * scale) for r in ratios[1:-1]] + [last]
            ratios = [max(r, last) for r in ratios]
        out = []
        for start, ratio in zip(starts, ratios, strict=True):
            count = max(1, min(n_visual, round(ratio * n_visual))) if n_visual else 0
            if out and count > out[-1][1]:
                count = out[-1][1]
            out.append((start, count))
        return out

    def check_layers(self, num_layers: int) -> None:
        """Refuse stage layers outside the decoder."""
        self.stages(num_layers, 1)


def parse_reduction(spec: Any, where: str = "token_reduction") -> list[Reducer]:
    """Parse a spec (a dict, a :class:`Reducer`, or a list of them) into reducers, checked strictly.

    A list applies in order and holds at most one pre-LLM method followed by at most one in-LLM
    method: two pre-LLM methods would score tokens the first one already moved, and two in-LLM
    schedules would prune the same layers twice.

    Args:
        spec: ``None`` (no reduction), a dict ``{"method": NAME, "keep": K, ...}``, a reducer, or a list.
        where: What the spec came from, for messages (``"token_reduction"``, a card path).

    Raises:
        ReductionSpecError: Unknown method or key, a value out of range, a bad order.
    """
    if spec is None:
        return []
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    reducers = [_parse_one(item, f"{where}[{i}]" if len(items) > 1 else where) for i, item in enumerate(items)]
    kinds = [r.where for r in reducers]
    if kinds.count(PRE_LLM) > 1 or kinds.count(IN_LLM) > 1 or kinds != sorted(kinds, key=[PRE_LLM, IN_LLM].index):
        names = [r.name for r in reducers]
        raise ReductionSpecError(f"{where}: {names} — a list holds at most one pre-LLM method "
                                 f"({', '.join(n for n, c in REDUCERS.items() if c.where == PRE_LLM)}) followed by at "
                                 f"most one in-LLM method ({', '.join(n for n, c in REDUCERS.items() if c.where == IN_LLM)})")
    return reducers


def _parse_one(item: Any, where: str) -> Reducer:
    if isinstance(item, Reducer):
        return item
    if not isinstance(item, Mapping):
        raise ReductionSpecError(f"{where}: expected a dict like {{'method': 'visionzip', 'keep': 0.25}}, "
                                 f"got {type(item).__name__}")
    if "method" not in item:
        raise ReductionSpecError(f"{where}: missing 'method' (one of {', '.join(list_reducers())})")
    method = item["method"]
    if method not in REDUCERS:
        raise ReductionSpecError(f"{where}: unknown method {method!r} (registered: {', '.join(list_reducers())})")
    cls = REDUCERS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(item) - known - {"method"})
    if unknown:
        raise ReductionSpecError(f"{where}: unknown key {unknown[0]!r} for {method} (known: {', '.join(sorted(known))})")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in item.items() if k != "method"}
    if cls is PyramidDrop and "keep" in kwargs and "ratios" in kwargs:
        ratios = kwargs["ratios"]
        if isinstance(kwargs["keep"], float) and isinstance(ratios, Sequence) and ratios and ratios[-1] != kwargs["keep"]:
            raise ReductionSpecError(f"{where}: pyramiddrop 'keep' {kwargs['keep']} differs from the last of "
                                     f"'ratios' {list(ratios)}; give one of them")
    try:
        if cls is PyramidDrop and "ratios" in kwargs and "keep" not in kwargs and isinstance(kwargs["ratios"], Sequence):
            # 'keep' is derived from the last ratio: check the ratios first, or a bad one is blamed on 'keep'.
            for i, ratio in enumerate(kwargs["ratios"]):
                _share(method, f"ratios[{i}]", ratio)
            kwargs["keep"] = kwargs["ratios"][-1] if kwargs["ratios"] else 1.0
        return cls(**kwargs)
    except ReductionSpecError as err:
        raise ReductionSpecError(f"{where}: {err}") from None
    except TypeError as err:  # a wrongly typed value a check did not reach
        raise ReductionSpecError(f"{where}: {method}: {err}") from None
