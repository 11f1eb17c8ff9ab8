"""Evaluation: accuracy next to FLOPs for every configuration and the router.

``visorlib.eval.evaluate(model_or_path, data, configs=...)`` (and the ``visorlib eval`` command)
scores a model on local LLaVA-style files or the standard benchmarks with the metrics of
:mod:`visorlib.eval.metrics`; :mod:`visorlib.eval.lmms` plugs visorlib models into lmms-eval.
"""

from .datasets import (
           TASKS,
           EvalDataset,
           EvalSample,
           TaskSpec,
           from_training_data,
           load_data,
           load_local,
           load_task,
)
from .metrics import METRICS, score
from .report import EvalReport, ReportRow
from .runner import Configuration, evaluate, parse_configs

__all__ = ["METRICS", "TASKS", "Configuration", "EvalDataset", "EvalReport", "EvalSample", "ReportRow", "TaskSpec",
           "evaluate", "from_training_data", "load_data", "load_local", "load_task", "parse_configs", "score"]
