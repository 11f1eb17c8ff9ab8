"""Task accuracy on a training run's held-out samples: what the router stage reports.

The recipe's router stage (:func:`visorlib.train.router.run_router_stage`) measures the fixed
configurations' and the router's task accuracy on its held-out split, before and after router
training, with the answers generated and scored exactly as ``visorlib eval`` does. That
measurement is evaluation, so it lives here and is handed to the stage by its caller (the
``visorlib train`` command): ``train/`` and ``eval/`` do not import each other.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .datasets import from_training_data
from .runner import evaluate


@torch.no_grad()
def held_out_task_accuracy(model, processor, datasets, held_out, configs, batch_size: int = 8,
                           max_skip_fraction: float = 0.1) -> dict[str, Any]:
    """Task accuracy (generated answers, :mod:`visorlib.eval`) of ``configs`` on the held-out samples.

    ``max_skip_fraction`` is the recipe's ``data.max_skip_fraction``: the same ceiling on broken
    samples as training, not evaluation's own default.

    Returns ``{dataset: {configuration: score in %}}`` plus, for the router, its choice counts
    under ``"router_choices"``.
    """
    rows: dict[str, list[int]] = defaultdict(list)
    for (name, i), _ in held_out:
        rows[name].append(i)
    data = [from_training_data(d, rows[d.name]) for d in datasets if rows.get(d.name)]
    if not data:
        return {}
    report = evaluate(model, data, configs=configs, batch_size=batch_size, processor=processor, progress=False,
                      max_skip_fraction=max_skip_fraction)
    out: dict[str, Any] = {}
    for row in report.rows:
        if row.category == "all":
            out.setdefault(row.dataset, {})[row.configuration] = row.score
            if row.choices:
                out.setdefault("router_choices", {})[row.dataset] = row.choices
    return out
