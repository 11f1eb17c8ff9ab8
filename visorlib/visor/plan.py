"""The layer plan: which decoder layers do what, and which configurations are allowed.

VISOR gives every decoder layer one role (paper eq. 3):

* **text-only** — the layer runs on the text tokens; visual tokens pass through untouched;
* **cross-attention (CA)** — text tokens first read the visual tokens through a
  :class:`~visorlib.visor.cross_attention.CrossAttention` block, then the layer runs on text only;
* **self-attention candidate (SA)** — when *executed*, the full layer runs over
  ``[visual; text]`` and updates the visual tokens too; when *skipped*, it acts as text-only.

A *configuration* is the set of SA candidates executed for a sample. Layers are numbered from 0.
A plan whose every layer is an SA candidate, with no CA layer and every layer executed, is the
dense model: the executor then runs exactly the dense computation.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ..config import ConfigError, VisorConfig
from ..validation import LayerChoiceError

TEXT, CROSS, SELF = "text", "cross", "self"


class LayerPlan:
    """Roles of a decoder's layers, validated, plus the configuration rules.

    Args:
        num_layers: Decoder depth.
        cfg: The VISOR section; None gives the dense plan (every layer an executed SA layer).
    """

    def __init__(self, num_layers: int, cfg: VisorConfig | None = None):
        self.num_layers = num_layers
        self.dense = cfg is None
        cfg = cfg or VisorConfig(sa_layers=list(range(num_layers)))
        # The section's own rules (no repeats, no layer both CA and SA, known init, packing >= 1)
        # were checked when the card was read (VisorConfig); the depth is known only here.
        for name in ("ca_layers", "sa_layers"):
            bad = [i for i in getattr(cfg, name) if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"visor.{name}: layers {bad} are out of range for a {num_layers}-layer decoder")
        self.cfg = cfg
        self.ca_layers = sorted(cfg.ca_layers)
        self.sa_layers = sorted(cfg.sa_layers)
        self.roles = [CROSS if i in cfg.ca_layers else SELF if i in cfg.sa_layers else TEXT for i in range(num_layers)]
        configs = cfg.configurations or [self.sa_layers]
        self.configurations = [self.validate(c, "visor.configurations") for c in configs]
        self.default = self.sa_layers if cfg.default is None else self.validate(cfg.default, "visor.default")

    def validate(self, layers: Sequence[int], what: str = "sa_layers") -> list[int]:
        """A sorted configuration, or a :class:`~visorlib.validation.LayerChoiceError` naming the problem.

        Layers must be ints (a bool or a float such as ``1.9`` is refused, never truncated), each
        an SA candidate of this plan, none repeated.
        """
        if hasattr(layers, "tolist") and not isinstance(layers, (list, tuple)):
            layers = layers.tolist()  # a tensor or array; a float one is refused below
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise LayerChoiceError(f"{what} must be a list of layer indices, got {layers!r}")
        not_ints = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if not_ints:
            raise LayerChoiceError(f"{what}={list(layers)!r}: layers must be ints, got {not_ints!r}")
        layers = [int(i) for i in layers]
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise LayerChoiceError(f"{what}={layers}: layers {repeated} are repeated")
        out_of_range = [i for i in layers if not 0 <= i < self.num_layers]
        if out_of_range:
            raise LayerChoiceError(f"{what}: layers {out_of_range} are out of range (decoder has {self.num_layers} layers)")
        not_candidates = [i for i in layers if i not in self.sa_layers]
        if not_candidates:
            raise LayerChoiceError(
                f"{what}: layers {not_candidates} are not self-attention candidates (candidates: {self.sa_layers})"
            )
        return sorted(layers)

    @property
    def always_executed(self) -> list[int]:
        """SA candidates that every viable configuration executes."""
        return sorted(set.intersection(*(set(c) for c in self.configurations)))

    @property
    def router_layer(self) -> int:
        """Layer whose output the router reads: the one before the first skippable SA candidate."""
        skippable = [i for i in self.sa_layers if i not in self.always_executed]
        if not skippable:
            raise ConfigError("no SA candidate is ever skipped: a router has nothing to choose")
        return skippable[0] - 1

    def cost(self, configuration: Sequence[int]) -> tuple[int, int]:
        """Sort key of a configuration's cost: executed SA layers, then the list position."""
        configuration = sorted(configuration)
        position = self.configurations.index(configuration) if configuration in self.configurations else -1
        return len(configuration), position

    def describe(self, configuration: Sequence[int] | None = None) -> str:
        """Short name such as ``8CA-2SA``."""
        configuration = self.default if configuration is None else configuration
        return f"{len(self.ca_layers)}CA-{len(configuration)}SA"


def validate_sa_layers(
    plan: LayerPlan, sa_layers: Any, batch: int, has_router: bool = False, model: str = "the model"
) -> list[list[int]] | None:
    """Per-sample configurations for a user's ``sa_layers``; None means "ask the router".

    The one check of ``sa_layers`` for every entry point (``forward``, ``generate``, FLOPs).

    Args:
        plan: The model's layer plan.
        sa_layers: None (the card's default), ``"all"``, ``"router"``, one list of layers for the
            whole batch, or one list per sample (a tensor or array is read with ``.tolist()``).
            A bare int is refused: it could mean a layer or a number of layers; write ``[4]``.
        batch: Samples in the batch.
        has_router: Whether ``"router"`` is available.
        model: The model's name, for messages.

    Raises:
        LayerChoiceError: (an InputError and a ConfigError) naming what is wrong.
    """
    if hasattr(sa_layers, "tolist") and not isinstance(sa_layers, (list, tuple, str)):
        sa_layers = sa_layers.tolist()
    if plan.dense and sa_layers not in (None, "all"):
        raise LayerChoiceError(f"sa_layers={sa_layers!r}: {model} is a dense model with no VISOR layer plan")
    if sa_layers is None:
        return [plan.default] * batch
    if isinstance(sa_layers, str):
        if sa_layers == "all":
            return [plan.sa_layers] * batch
        if sa_layers == "router":
            if not has_router:
                raise LayerChoiceError(f"sa_layers='router' but {model} has no router")
            return None
        raise LayerChoiceError(f"sa_layers must be None, 'all', 'router' or lists of layers, got {sa_layers!r}")
    if isinstance(sa_layers, numbers.Number):
        raise LayerChoiceError(f"sa_layers={sa_layers!r} is a bare number; pass a list of layers such as "
                               f"[{sa_layers!r}] (a bare number could mean a layer or a count of layers)")
    if not isinstance(sa_layers, Sequence):
        raise LayerChoiceError(f"sa_layers must be None, 'all', 'router' or lists of layers, got {type(sa_layers).__name__}")
    sa_layers = list(sa_layers)
    nested = [isinstance(c, (list, tuple)) for c in sa_layers]
    if sa_layers and all(nested):
        if len(sa_layers) != batch:
            raise LayerChoiceError(f"sa_layers gives {len(sa_layers)} configurations for a batch of {batch}")
        return [plan.validate(c, f"sa_layers[{i}]") for i, c in enumerate(sa_layers)]
    if any(nested):
        raise LayerChoiceError(f"sa_layers={sa_layers!r} mixes lists and layers; pass one list of layers, or one "
                               "list per sample")
    return [plan.validate(sa_layers)] * batch
