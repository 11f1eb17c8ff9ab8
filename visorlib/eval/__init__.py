"""Evaluation: accuracy next to FLOPs for every configuration and the router.

``visorlib.eval.evaluate(model_or_path, data, configs=...)`` (and the ``visorlib eval`` command)
scores a model on local LLaVA-style files or the standard benchmarks with the metrics of
:mod:`visorlib.eval.metrics`; :mod:`visorlib.eval.lmms` plugs visorlib models into lmms-eval.

The names below load on first use (PEP 562): ``visorlib --help`` registers ``visorlib eval``
(:mod:`visorlib.eval.cli`) without loading torch and the runner.
"""

from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "TASKS": "datasets", "EvalDataset": "datasets", "EvalSample": "datasets", "TaskSpec": "datasets",
    "from_training_data": "datasets", "load_data": "datasets", "load_local": "datasets", "load_task": "datasets",
    "METRICS": "metrics", "score": "metrics",
    "EvalReport": "report", "ReportRow": "report",
    "Configuration": "runner", "evaluate": "runner", "parse_configs": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
