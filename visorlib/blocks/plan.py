"""The layer plan: which decoder layers do what, and which configurations are allowed.

VISOR gives every decoder layer one role (paper eq. 3):

* **text-only** — the layer runs on the text tokens; visual tokens pass through untouched;
* **cross-attention (CA)** — text tokens first read the visual tokens through a
  :class:`~visorlib.blocks.cross_attention.CrossAttention` block, then the layer runs on text only;
* **self-attention candidate (SA)** — when *executed*, the full layer runs over
  ``[visual; text]`` and updates the visual tokens too; when *skipped*, it acts as text-only.

A *configuration* is the set of SA candidates executed for a sample. Layers are numbered from 0.
A plan whose every layer is an SA candidate, with no CA layer and every layer executed, is the
dense model: the executor then runs exactly the dense computation.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import ConfigError, VisorConfig

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
        for name in ("ca_layers", "sa_layers"):
            layers = getattr(cfg, name)
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"visor.{name}: layers {bad} are out of range for a {num_layers}-layer decoder")
            if len(set(layers)) != len(layers):
                raise ConfigError(f"visor.{name}: repeated layers in {layers}")
        both = sorted(set(cfg.ca_layers) & set(cfg.sa_layers))
        if both:
            raise ConfigError(f"visor: layers {both} are both cross-attention and self-attention candidates")
        if cfg.cross_attention_init not in ("copy", "zero_gate"):
            raise ConfigError(f"visor.cross_attention_init must be 'copy' or 'zero_gate', got {cfg.cross_attention_init!r}")
        if cfg.packing_ratio < 1:
            raise ConfigError(f"visor.packing_ratio must be >= 1 (a reduction), got {cfg.packing_ratio}")
        self.cfg = cfg
        self.ca_layers = sorted(cfg.ca_layers)
        self.sa_layers = sorted(cfg.sa_layers)
        self.roles = [CROSS if i in cfg.ca_layers else SELF if i in cfg.sa_layers else TEXT for i in range(num_layers)]
        configs = cfg.configurations or [self.sa_layers]
        self.configurations = [self.validate(c, "visor.configurations") for c in configs]
        self.default = self.sa_layers if cfg.default is None else self.validate(cfg.default, "visor.default")

    def validate(self, layers: Sequence[int], what: str = "sa_layers") -> list[int]:
        """A sorted configuration, or a ConfigError naming the offending layers."""
        layers = [int(i) for i in layers]
        out_of_range = [i for i in layers if not 0 <= i < self.num_layers]
        if out_of_range:
            raise ConfigError(f"{what}: layers {out_of_range} are out of range (decoder has {self.num_layers} layers)")
        not_candidates = [i for i in layers if i not in self.sa_layers]
        if not_candidates:
            raise ConfigError(
                f"{what}: layers {not_candidates} are not self-attention candidates (candidates: {self.sa_layers})"
            )
        return sorted(set(layers))

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
