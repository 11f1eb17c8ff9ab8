"""What ``--configs`` and ``--token-reduction`` name: the evaluation's columns.

``--configs`` uses the ``sa_layers`` grammar of the whole library (:data:`CONFIG_GRAMMAR`): a
configuration is comma-separated self-attention layers, several are separated by ``;``, and the
words are ``default``, ``all``, ``none`` and ``router``. Each column may be evaluated again under
token-reduction specs (``"1,4 + visionzip"``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


#: The ``--configs`` grammar, quoted by every error about it (the same words as ``sa_layers`` elsewhere).
CONFIG_GRAMMAR = ("a configuration is comma-separated self-attention layers such as '1,4'; several are "
                  "separated by ';'; the words are 'default', 'all', 'none' and 'router'")


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
    items = spec if isinstance(spec, (list, tuple)) else str("default" if spec is None else spec).split(";")
    out: list[Configuration] = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if item == "":
            continue  # "1,4;" is one configuration, not an empty one too
        if item in ("none", "[]"):
            item = []  # the configuration that executes no self-attention layer (CA only)
        if plan.dense:
            if item not in ("default", "all", "dense"):
                raise ValueError(f"--configs {item!r}: {model.cfg.name} is a dense model (only 'default'/'all')")
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


def _layers(plan, item: Any) -> list[int]:
    """One layer list (``"1,4"``, ``"[1, 4]"`` or a list), checked against the plan."""
    parts = item if isinstance(item, (list, tuple)) else [p.strip() for p in item.strip("[] ").split(",")]
    for part in parts:
        if isinstance(part, bool) or not (isinstance(part, int) or (isinstance(part, str) and part.isdigit())):
            raise ValueError(f"--configs {item!r}: {part!r} is not a layer number; {CONFIG_GRAMMAR}")
    try:
        return list(plan.validate([int(p) for p in parts]))
    except ValueError as err:
        raise ValueError(f"--configs {item!r}: {err}") from err


def _label(config: Sequence[int]) -> str:
    """``"1,4"``; ``"none"`` for the configuration without self-attention layers."""
    return ",".join(str(i) for i in config) or "none"
