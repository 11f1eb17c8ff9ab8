"""What a forward pass was asked to execute, and what it executed.

A user writes ``sa_layers`` in one of several forms (None, ``"all"``, ``"router"``, one list of
layers, one list per sample). It is parsed **once**, at the entry point, into a
:class:`LayerRequest`: a per-sample boolean mask over the decoder's layers plus how it was chosen.
Everything below the entry point (executor, FLOPs, evaluation) reads that object. What actually
ran — after the router, if it decided — comes back separately as a :class:`VisorReport` on the
model's output.

Where ``sa_layers`` is written as *text* — ``visorlib eval --configs``, ``visorlib generate`` and
``analyze --sa-layers``, the lmms-eval plugin's ``model_args``, the server's request body — it
follows one grammar, :data:`SA_LAYERS_GRAMMAR`, read by :func:`parse_sa_layers` (several
configurations) and :func:`parse_configuration` (exactly one). Those functions know no model: they
turn text into words and layer lists; checking the layers against a plan stays with
:class:`LayerRequest` and :meth:`~visorlib.visor.plan.LayerPlan.validate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import LayerChoiceError
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


#: The one text grammar of ``sa_layers``, quoted by every error about it.
SA_LAYERS_GRAMMAR = ("a configuration is comma-separated self-attention layers such as '1,4' (or '1-4' where "
                     "commas cannot be written); several are separated by ';'; the words are 'default', 'all', "
                     "'none' and 'router'")

#: Words of the grammar that stand for a configuration chosen elsewhere ('none' is the empty list).
WORDS = ("default", "all", "router")


class SaLayersSyntaxError(LayerChoiceError):
    """Text that is not in the ``sa_layers`` grammar (a :class:`ValueError`; the message quotes the grammar)."""


def parse_sa_layers(spec: Any, what: str = "sa_layers") -> list[str | list[int]]:
    """The configurations named by ``spec``, in order: each ``"default"``, ``"all"``, ``"router"`` or a layer list.

    Args:
        spec: Text in :data:`SA_LAYERS_GRAMMAR` (``"router;1,4;none"``), None (``"default"``), or a
            list whose items are such text or lists of layer numbers (what Python callers pass).
        what: The option or field, for messages (``"--configs"``, ``"sa_layers"``).

    Returns:
        One item per configuration; ``"none"`` and ``"[]"`` become ``[]``; an empty item (a
        trailing ``;``) is dropped. Layers are not checked against a model here.

    Raises:
        SaLayersSyntaxError: An item outside the grammar, or no configuration at all.
    """
    if spec is None:
        return ["default"]
    items = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(";")
    out: list[str | list[int]] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if item == "":
                continue  # "1,4;" is one configuration, not an empty one too
            if item in WORDS:
                out.append(item)
                continue
            if item in ("none", "[]"):
                out.append([])  # the configuration that executes no self-attention layer
                continue
        out.append(_layer_list(item, what))
    if not out:
        raise SaLayersSyntaxError(f"{what} {spec!r} names no configuration; {SA_LAYERS_GRAMMAR}")
    return out


def parse_configuration(spec: Any, what: str = "sa_layers") -> str | list[int] | None:
    """Exactly one configuration, as ``forward``'s ``sa_layers``: None (the default), ``"all"``, ``"router"`` or layers.

    Raises:
        SaLayersSyntaxError: ``spec`` is outside the grammar or names several configurations.
    """
    if isinstance(spec, (list, tuple)) and not any(isinstance(i, (list, tuple, str)) for i in spec):
        spec = [spec]  # a plain list of layers is one configuration, not one per item
    items = parse_sa_layers(spec, what)
    if len(items) != 1:
        raise SaLayersSyntaxError(f"{what} {spec!r} names {len(items)} configurations where one is expected; "
                                  f"{SA_LAYERS_GRAMMAR}")
    return None if items[0] == "default" else items[0]


def _layer_list(item: Any, what: str) -> list[int]:
    """One layer list: ``"1,4"``, ``"1-4"``, ``"[1, 4]"`` or a list of ints (order kept; the plan sorts)."""
    if isinstance(item, str):
        text = item.strip("[] ")
        parts = [p.strip() for p in text.replace("-", ",").split(",")]
    elif isinstance(item, Sequence):
        parts = list(item)
    else:
        raise SaLayersSyntaxError(f"{what} {item!r} is not a configuration; {SA_LAYERS_GRAMMAR}")
    for part in parts:
        if isinstance(part, bool) or not (isinstance(part, int) or (isinstance(part, str) and part.isdigit())):
            raise SaLayersSyntaxError(f"{what} {item!r}: {part!r} is not a layer number; {SA_LAYERS_GRAMMAR}")
    return [int(p) for p in parts]


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
