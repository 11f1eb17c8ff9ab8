"""What a forward pass was asked to execute, and what it executed.

A user writes ``sa_layers`` in one of several forms (None, ``"all"``, ``"router"``, one list of
layers, one list per sample). It is parsed **once**, at the entry point, into a
:class:`LayerRequest`: a per-sample boolean mask over the decoder's layers plus how it was chosen.
Everything below the entry point (executor, FLOPs, evaluation) reads that object. What actually
ran — after the router, if it decided — comes back separately as a :class:`VisorReport` on the
model's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .plan import LayerPlan, validate_sa_layers

#: How a request's configurations were chosen.
HOW = ("default", "all", "given", "router")


@dataclass(frozen=True)
class LayerRequest:
    """The parsed ``sa_layers`` of one call.

    Attributes:
        configurations: SA layers to execute, one sorted list per sample; under ``"router"``,
            the layers every configuration shares (what runs before the router decides).
        how: ``"default"`` (the card's default), ``"all"`` (every candidate), ``"given"`` (layers
            passed by the caller) or ``"router"`` (the router decides per sample after its layer).
    """

    configurations: tuple[tuple[int, ...], ...]
    how: str

    @classmethod
    def parse(cls, plan: LayerPlan, sa_layers: Any, batch: int, has_router: bool = False,
              model: str = "the model") -> LayerRequest:
        """Check ``sa_layers`` (see :func:`~visorlib.visor.plan.validate_sa_layers`) and freeze it.

        An existing :class:`LayerRequest` is returned as it is (it was checked when it was made),
        provided it covers ``batch`` samples.
        """
        if isinstance(sa_layers, LayerRequest):
            if len(sa_layers.configurations) != batch:
                raise ValueError(f"a LayerRequest for {len(sa_layers.configurations)} samples was given a batch of {batch}")
            return sa_layers
        configs = validate_sa_layers(plan, sa_layers, batch, has_router, model)
        if configs is None:
            return cls(tuple(tuple(plan.always_executed) for _ in range(batch)), "router")
        how = "default" if sa_layers is None else "all" if sa_layers == "all" else "given"
        return cls(tuple(tuple(c) for c in configs), how)

    @property
    def routed(self) -> bool:
        """Whether the router chooses the layers after its own."""
        return self.how == "router"

    def mask(self, num_layers: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[B, num_layers]`` bool: True where the sample executes the layer's self-attention."""
        return layer_mask(self.configurations, num_layers, device)


def layer_mask(configurations, num_layers: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[B, num_layers]`` bool table of per-sample configurations (lists of executed SA layers)."""
    table = torch.zeros(len(configurations), num_layers, dtype=torch.bool)
    for row, config in enumerate(configurations):
        table[row, list(config)] = True
    return table.to(device)


@dataclass
class VisorReport:
    """What a VISOR forward pass executed.

    Attributes:
        executed: SA layers each sample ran (after routing), one sorted list per sample.
        how: How they were chosen (see :class:`LayerRequest`).
        router_logits: ``[routing tokens, configurations]`` when the router decided, else None.
        routed_samples: ``[routing tokens]``: the sample each row of ``router_logits`` belongs to.
    """

    executed: list[list[int]]
    how: str
    router_logits: torch.Tensor | None = None
    routed_samples: torch.Tensor | None = None
