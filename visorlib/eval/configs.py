"""What ``--configs`` and ``--token-reduction`` name: the evaluation's columns.

``--configs`` uses the ``sa_layers`` grammar of the whole library, read by
:func:`visorlib.visor.request.parse_sa_layers` (:data:`~visorlib.visor.request.SA_LAYERS_GRAMMAR`):
a configuration is comma-separated self-attention layers, several are separated by ``;``, and the
words are ``default``, ``all``, ``none`` and ``router``. This module only turns those words into the
model's columns. Each column may be evaluated again under token-reduction specs
(``"1,4 + visionzip"``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..visor.request import SA_LAYERS_GRAMMAR, parse_sa_layers

log = logging.getLogger("visorlib.eval")
ROUTER = "router"


@dataclass(frozen=True)
class Configuration:
    """One column of the evaluation: a label, what ``sa_layers`` to run it with and its token reduction."""

    label: str
    sa_layers: Any  # a list of layers, "all" (a dense model) or "router"
    token_reduction: Any = None  # a spec (docs/token-reduction.md); None: the card's

    @property
    def reduction_key(self) -> str:
        """The spec as text: samples are encoded once per spec (a pre-LLM method changes the prompt)."""
        return json.dumps(self.token_reduction, sort_keys=True)


def with_reductions(columns: list[Configuration], specs: Sequence[Any]) -> list[Configuration]:
    """``columns``, then every column again under each token-reduction spec (label ``"1,4 + visionzip"``).

    Raises:
        ReductionSpecError: A bad spec (before any sample is generated).
    """
    from ..visor.reduction import parse_reduction

    out = list(columns)
    for spec in specs:
        parse_reduction(spec, "--token-reduction")
        name = reduction_label(spec)
        out += [Configuration(f"{c.label} + {name}", c.sa_layers, spec) for c in columns]
    return out


def reduction_label(spec: Any) -> str:
    """``visionzip`` for a method at its defaults, else its keys: ``visionzip(keep=64)``, ``pooling+fastv``."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    parts = []
    for item in items:
        extra = ",".join(f"{k}={v}" for k, v in item.items() if k != "method")
        parts.append(f"{item['method']}({extra})" if extra else item["method"])
    return "+".join(parts)


#: The ``--configs`` grammar: the library's one ``sa_layers`` grammar (kept under this name for callers).
CONFIG_GRAMMAR = SA_LAYERS_GRAMMAR


def parse_configs(model, spec: str | Sequence[Any] | None) -> list[Configuration]:
    """Configurations named by ``spec``.

    ``"default"`` (the card's default configuration), ``"all"`` (every configuration of the plan,
    then the router when there is one), ``"router"``, or layer lists such as ``"1,4"``; several
    separated by ``;`` (``"router;1,4;1,4,7"``); ``none`` is the configuration that executes no
    self-attention layer. A dense model has the single ``dense`` column. A layer list that is not
    one of the card's configurations (the ones training samples) is evaluated with a warning.

    Raises:
        ValueError: ``spec`` names no configuration, or an item that is not in the grammar
            (:data:`CONFIG_GRAMMAR`) or not a valid layer set of the model.
    """
    plan = model.plan
    if plan.dense and isinstance(spec, str) and spec.strip() == "dense":
        spec = "default"  # the label of a dense model's one column, read back from a report
    out: list[Configuration] = []
    for item in parse_sa_layers(spec, "--configs"):
        if plan.dense:
            if item not in ("default", "all"):
                raise ValueError(f"--configs {_text(item)!r}: {model.cfg.name} is a dense model (only 'default'/'all')")
            out.append(Configuration("dense", "all"))
        elif item == "default":
            out.append(Configuration(_label(plan.default), plan.default))
        elif item == "all":
            out += [Configuration(_label(c), c) for c in plan.configurations]
            if model.router is not None:
                out.append(Configuration(ROUTER, ROUTER))
        elif item == ROUTER:
            if model.router is None:
                raise ValueError(f"--configs router: {model.cfg.name} has no router")
            out.append(Configuration(ROUTER, ROUTER))
        else:
            config = _layers(plan, item)
            if config not in [list(c) for c in plan.configurations]:
                log.warning("--configs %r: configuration %s is not one of the %d configurations of %s's card (the "
                            "ones its training samples); its score is of a configuration the model was not trained "
                            "to run", _label(config), _label(config), len(plan.configurations), model.cfg.name)
            out.append(Configuration(_label(config), config))
    if not out:
        raise ValueError(f"--configs {spec!r} names no configuration; {CONFIG_GRAMMAR}")
    unique = {c.label: c for c in out}  # a configuration named twice is evaluated once
    return list(unique.values())


def _layers(plan, layers: list[int]) -> list[int]:
    """One layer list from the grammar, checked against the plan."""
    try:
        return list(plan.validate(layers))
    except ValueError as err:
        raise ValueError(f"--configs {_text(layers)!r}: {err}") from err


def _text(item: Any) -> str:
    """An item of the grammar as the user wrote it (``"1,4"``, ``"none"``, a word)."""
    return item if isinstance(item, str) else _label(item)


def _label(config: Sequence[int]) -> str:
    """``"1,4"``; ``"none"`` for the configuration without self-attention layers."""
    return ",".join(str(i) for i in config) or "none"
