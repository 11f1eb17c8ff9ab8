"""The predictions file: a cache keyed by everything that produced each line, and the run's outputs.

A predictions line is reused only when its ``fingerprint`` equals the one this run would give it:
a hash of the checkpoint (path + size + modification time of its weight and config files, or the
parameters' bytes for a model built in memory), the dtype, the card, the answer length, the
configuration and token reduction, and the sample's dataset, index, question, references, metric,
category and image bytes. Any change recomputes the line instead of reporting another model's or
another dataset's score; the older line stays in the file (it is still right for what produced it),
and a line appearing twice is read once.

Two runs appending to one file at once would interleave lines, so a run holds
:class:`PredictionsLock` (the trainer's ``flock`` run lock, on a hidden file beside the
predictions) for as long as it reads and writes them; a second run is refused, naming the holder.

:func:`check_outputs` refuses, before anything runs, an output (report, predictions, plot) that
resolves to an input file or to another output, or that exists and was not written by
``visorlib eval``: nothing a user wrote is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.conversations import DataError
from ..data.runlock import RunLock
from .datasets import EvalDataset, EvalSample
from .report import PLOT_SOFTWARE

log = logging.getLogger("visorlib.eval")

#: Keys every predictions line has (a line without them is not a predictions record).
RECORD_KEYS = ("sample", "configuration", "prediction", "score")
_REPORT_KEYS = ("model", "configurations", "rows")


class PredictionsLock(RunLock):
    """Exclusive lock on one predictions file (``.<name>.lock`` beside it) for one evaluation run."""

    def __init__(self, path: str | Path):
        self.target = Path(path)
        super().__init__(self.target.parent, owner=f"visorlib eval --predictions {self.target}",
                         name=f".{self.target.name}.lock")

    def busy_message(self, holder: str) -> str:
        return (f"--predictions {self.target} is in use by another visorlib eval ({holder}); wait for it to "
                "finish or use another predictions file")


# -- fingerprints ------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def parameter_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer's bytes (a model built or changed in memory has no file to name)."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "parameters:" + hasher.hexdigest()


def checkpoint_fingerprint(model: torch.nn.Module, from_folder: bool) -> str:
    """What identifies the weights: the checkpoint's files (cheap) or the parameters themselves.

    Args:
        model: The model evaluated.
        from_folder: It was loaded here, unchanged, from ``model.checkpoint_dir``.
    """
    folder = getattr(model, "checkpoint_dir", None)
    files = sorted(p for pattern in ("*.safetensors", "*.json") for p in Path(folder).glob(pattern)) \
        if from_folder and folder is not None else []
    # A dense checkpoint loaded into a VISOR card gets freshly initialised blocks: its files do not say
    # what ran, so it is hashed like a model built in memory.
    fresh_blocks = getattr(model.cfg, "visor", None) is not None and not (Path(folder or ".") / "visorlib.json").exists()
    if not any(p.suffix == ".safetensors" for p in files) or fresh_blocks:
        return parameter_digest(model)
    return "files:" + _digest([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def sample_digest(sample: EvalSample) -> str:
    """Hash of what the sample asks: question, references, metric, category and its images' bytes."""
    hasher = hashlib.blake2b(digest_size=16)
    for file in sample.files:
        try:
            hasher.update(Path(file).read_bytes())
        except OSError:
            hasher.update(f"unreadable:{file}".encode())  # the sample fails when it is encoded
    return _digest({"dataset": sample.dataset, "index": sample.index, "question": sample.question,
                    "answers": sample.answers, "metric": sample.metric, "options": sample.metric_options,
                    "category": sample.category, "images": hasher.hexdigest(), "image_id": sample.image_id})


def line_fingerprint(run: dict[str, Any], configuration: Any, sample_hash: str) -> str:
    """The key of one predictions line: the run's identity, the column's and the sample's."""
    return _digest({"run": run, "label": configuration.label, "sa_layers": configuration.sa_layers,
                    "token_reduction": configuration.token_reduction, "sample": sample_hash})


# -- reading -----------------------------------------------------------------------------------------


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file, each fingerprint once (the first line with it).

    A last line cut short by a kill (no newline, not JSON) is dropped and the file rewritten
    without it; any other line that is not a JSON object with :data:`RECORD_KEYS` is an error.

    Raises:
        DataError: A line that is not a predictions record, naming the file and the line.
    """
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--predictions {path}: not UTF-8 text, so not a predictions file") from None
    lines = text.split("\n")
    records, seen, cut = [], set(), False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                cut = True  # appended lines end with "\n": only a killed write leaves a cut one, at the end
                continue
            raise DataError(f"--predictions {path}: line {number} is not JSON ({err.msg}); not a predictions "
                            "file, or a damaged one") from None
        if not isinstance(record, dict):
            raise DataError(f"--predictions {path}: line {number} holds a {type(record).__name__}, not a "
                            "predictions record (a JSON object)")
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise DataError(f"--predictions {path}: line {number} is not a predictions record (no "
                            f"{', '.join(missing)})")
        key = record.get("fingerprint") or (record["sample"], record["configuration"], line)
        if key not in seen:  # two runs that once appended the same line: read it once
            seen.add(key)
            records.append(record)
    if cut:
        log.warning("%s: dropped an incomplete last line left by an interrupted run", path)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


# -- outputs -----------------------------------------------------------------------------------------


def input_files(datasets: Iterable[EvalDataset]) -> dict[Path, str]:
    """Every file the evaluation reads (data files, images), resolved, with what it is."""
    out: dict[Path, str] = {}
    for dataset in datasets:
        source = Path(dataset.source)
        if source.is_file():
            out[source.resolve()] = f"the data file {dataset.source}"
        for sample in dataset.samples:
            for file in sample.files:
                out.setdefault(Path(file).resolve(), f"an image of {dataset.source}[{sample.index}]")
    return out


def _written_by_eval(path: Path, output: str) -> bool:
    """Whether an existing file is an ``output`` of eval's (empty files count: nothing to lose)."""
    if path.stat().st_size == 0:
        return True
    if output == "predictions":
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20)
        try:
            record = json.loads(first)
        except ValueError:
            return False
        return isinstance(record, dict) and all(k in record for k in RECORD_KEYS)
    if output == "report":
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return False
        return isinstance(report, dict) and all(k in report for k in _REPORT_KEYS)
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == PLOT_SOFTWARE
    except (OSError, ValueError):
        return False


def check_outputs(outputs: Sequence[tuple[str, str | Path | None, str]], datasets: Sequence[EvalDataset]) -> None:
    """Refuse outputs that would overwrite an input, each other, or a file ``visorlib eval`` did not write.

    Args:
        outputs: ``(flag, path, output)`` with output ``"report"``, ``"predictions"`` or ``"plot"``;
            a None path is not written.
        datasets: The evaluation's inputs.

    Raises:
        DataError: Naming the flag, the path and what it would overwrite.
    """
    inputs = input_files(datasets)
    taken: dict[Path, str] = {}
    named = [(flag, path, output, Path(path).expanduser().resolve()) for flag, path, output in outputs if path is not None]
    for flag, path, _, real in named:
        if real in inputs:
            raise DataError(f"{flag} {path} is {inputs[real]}, an input of this evaluation; refusing to overwrite "
                            "it (choose another output file)")
        if real in taken:
            raise DataError(f"{flag} {path} is also the {taken[real]} output; give each output its own file")
        taken[real] = flag
    for flag, path, output, real in named:
        if real.is_file() and not _written_by_eval(real, output):
            what = {"report": "a visorlib eval report", "predictions": "a predictions file",
                    "plot": "a plot written by visorlib eval"}[output]
            raise DataError(f"{flag} {path} exists and is not {what}; refusing to overwrite it (remove it or "
                            "choose another file)")
