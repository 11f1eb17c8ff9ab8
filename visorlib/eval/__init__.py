"""Evaluation: accuracy next to FLOPs for every configuration and the router.

``visorlib.eval.evaluate(model_or_path, data, configs=...)`` (and the ``visorlib eval`` command)
scores a model on local LLaVA-style files or the standard benchmarks with the metrics of
:mod:`visorlib.eval.metrics`; :mod:`visorlib.eval.lmms` plugs visorlib models into lmms-eval.

The names below load on first use (PEP 562): ``visorlib --help`` registers ``visorlib eval``
(:mod:`visorlib.eval.cli`) without loading torch and the runner.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "TASKS": "datasets", "EvalDataset": "datasets", "EvalSample": "datasets", "TaskSpec": "datasets",
    "from_training_data": "datasets", "load_data": "datasets", "load_local": "datasets", "load_task": "datasets",
    "METRICS": "metrics", "score": "metrics",
    "held_out_task_accuracy": "held_out",
    "EvalReport": "report", "ReportRow": "report",
    "Configuration": "runner", "evaluate": "runner", "parse_configs": "runner",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
