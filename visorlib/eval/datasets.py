"""Evaluation data: local LLaVA-style files and the standard benchmarks (through ``datasets``).

Both kinds become a list of :class:`EvalSample` — a question in LLaVA data style (``"<image>\\n..."``),
its images (opened only when the sample is evaluated), the reference answers, the metric that
scores it and an optional category.

* **Local files** are the training format (:mod:`visorlib.data.conversations`, whose row reader and image
  opening are reused): JSON or JSONL rows with ``conversations``; the references are ``answers``
  (a string or a list) or, without it, the first assistant turn. Optional per-row ``category``
  and ``metric`` fields.
* **Benchmarks** come from :data:`TASKS`: each spec names the Hub dataset, its split, the columns
  and the prompt suffix lmms-eval uses for LLaVA-OneVision, so scores are comparable with published
  numbers. They are read with ``datasets`` from the Hub cache (``HF_DATASETS_OFFLINE=1`` is
  respected) or from a folder written by ``Dataset.save_to_disk``.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.conversations import ROLES, ConversationDataset, DataError
from ..data.specs import DatasetSpec
from .metrics import METRICS
from .report import ALL

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class EvalSample:
    """One question to answer.

    Attributes:
        dataset: Dataset name (a table section).
        index: Row index in its source (with ``source``, how broken rows are reported).
        source: The file or Hub dataset the row comes from.
        question: User turn in LLaVA data style: one ``<image>`` placeholder per image.
        answers: Reference answers.
        metric: Name in :data:`~visorlib.eval.metrics.METRICS`.
        category: Optional sub-group (a table row of its own).
        metric_options: Extra keyword arguments of the metric (e.g. the number of options).
        image_loader: Returns the sample's images; raises :class:`DataError` when one is broken.
        files: The image files it reads (hashed into its predictions' fingerprint; never an output).
        image_id: What identifies images that are not files (a Hub table's fingerprint and row).

    Raises:
        DataError: ``category`` is ``"all"``, the name of the report's whole-dataset row (a row of
            that category would be counted twice in it).
    """

    dataset: str
    index: int
    source: str
    question: str
    answers: list[str]
    metric: str
    category: str | None = None
    metric_options: dict[str, Any] = field(default_factory=dict)
    image_loader: Callable[[], list[Image.Image]] = list
    files: tuple[str, ...] = ()
    image_id: str = ""

    def __post_init__(self):
        if self.category == ALL:
            raise DataError(f"{self.source}[{self.index}]: category {ALL!r} is reserved for the report's row of "
                            "the whole dataset; rename the category")

    @property
    def key(self) -> str:
        """Identity of the sample in a predictions file."""
        return f"{self.dataset}/{self.index}"

    def images(self) -> list[Image.Image]:
        """The sample's images, opened now (RGB)."""
        return self.image_loader()


@dataclass
class EvalDataset:
    """The samples of one dataset, and the rows that could not become samples."""

    name: str
    source: str
    samples: list[EvalSample]
    problems: list[tuple[int, str]] = field(default_factory=list)


def _answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _local_answers(value: Any, where: str) -> list[str]:
    """A row's ``answers``: a string or number, or a non-empty list of them.

    Anything else is refused rather than turned into text: ``[null]`` would make ``"None"`` a
    reference answer, and a dict or ``true`` is not an answer a model can give.
    """
    def plain(v: Any) -> bool:
        return isinstance(v, (str, int, float)) and not isinstance(v, bool)

    items = value if isinstance(value, list) else [value]
    if not items or not all(plain(v) for v in items):
        got = f"{type(value).__name__} {value!r}"
        raise DataError(f"{where}: 'answers' must be a string or a list of strings, got {got[:80]}")
    return [str(v) for v in items]


def load_local(path: str | Path, image_root: str | None = None, metric: str = "exact_match",
               name: str | None = None, allow_outside_image_root: bool = False) -> EvalDataset:
    """A LLaVA-style JSON / JSONL file as evaluation samples.

    Args:
        path: The file.
        image_root: Folder image paths are relative to (default: the file's folder).
        metric: Metric of rows without a ``metric`` field.
        name: Dataset name (default: the file's stem).

        allow_outside_image_root: Accept image paths that leave the image root.

    Returns:
        The samples; rows without a question, without a reference answer, with an unknown
        metric or with a missing image are listed in ``problems`` as ``(index, message)``.

    Raises:
        DataError: The file cannot be read, ``metric`` is unknown or ``image_root`` is not a folder
            (each would break every row).
    """
    if metric not in METRICS:
        raise DataError(f"--metric {metric!r} is not a metric (known: {', '.join(sorted(METRICS))})")
    if image_root is not None and not Path(image_root).is_dir():
        raise DataError(f"--image-root {image_root}: {'not a folder' if Path(image_root).exists() else 'not found'}")
    # The training dataset reads the rows and opens images; its processor is not needed here.
    source = ConversationDataset(DatasetSpec(path=str(path), image_root=image_root, name=name), None, max_length=0,
                                 allow_outside_image_root=allow_outside_image_root,
                                 outside_root_option="--allow-outside-image-root (visorlib eval)")
    return from_training_data(source, metric=metric)


def from_training_data(source: ConversationDataset, indices=None, metric: str = "exact_match") -> EvalDataset:
    """Rows of a training dataset as evaluation samples (e.g. the router stage's held-out rows).

    Args:
        source: A training :class:`~visorlib.data.conversations.ConversationDataset`.
        indices: Row indices to keep (default: all).
        metric: Metric of rows without a ``metric`` field.
    """
    samples, problems = [], []
    for index in range(len(source.rows)) if indices is None else sorted(indices):
        try:
            samples.append(_local_sample(source, index, source.rows[index], metric))
        except DataError as err:
            problems.append((index, str(err)))
    return EvalDataset(source.name, str(source.path), samples, problems)


def _local_sample(source: ConversationDataset, index: int, row: dict, metric: str) -> EvalSample:
    where = f"{source.path}[{index}]"
    turns = [(ROLES.get(t.get("from")), t.get("value")) for t in row.get("conversations") or [] if isinstance(t, dict)]
    questions = [text for role, text in turns if role == "user" and isinstance(text, str)]
    if not questions:
        raise DataError(f"{where}: no question (a 'human' turn in 'conversations')")
    answers = _local_answers(row["answers"], where) if "answers" in row else \
        [t for r, t in turns if r == "assistant"][:1]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: no reference answer (an 'answers' field or a 'gpt' turn)")
    row_metric = row.get("metric", metric)
    if row_metric not in METRICS:
        raise DataError(f"{where}: unknown metric {row_metric!r} (known: {', '.join(sorted(METRICS))})")
    if source.media(index, "video"):
        raise DataError(f"{where}: video rows are not supported by visorlib eval")
    relative = source.media(index, "images")
    for name in relative:
        if not (source.root / name).exists():
            raise DataError(f"{where}: image {source.root / name} not found")
    question = questions[0]
    if relative and "<image>" not in question:
        question = "<image>\n" * len(relative) + question  # LLaVA convention: images first
    category = row.get("category")
    return EvalSample(source.name, index, str(source.path), question, answers, row_metric,
                      None if category is None else str(category),
                      image_loader=lambda: [source._open(index, name) for name in relative],
                      files=tuple(str(source.root / name) for name in relative))


# -- benchmark task specs ----------------------------------------------------------------------------


def _options(letters_and_texts) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in letters_and_texts)


def _indexed_choices(doc: dict, column: str) -> list[tuple[str, str]]:
    return list(zip(string.ascii_uppercase, doc[column], strict=False))


@dataclass(frozen=True)
class TaskSpec:
    """How one benchmark's rows become :class:`EvalSample` s (lmms-eval's LLaVA-OneVision prompts).

    Attributes:
        name: Task name (lmms-eval's, e.g. ``docvqa_val``).
        hub_id: Hub dataset id (lmms-eval's copy).
        config: Dataset configuration name, if any.
        split: Split evaluated.
        metric: Metric name.
        prompt: ``doc -> question text`` (without the image placeholder and the suffix).
        post_prompt: Suffix appended to the question.
        answers: ``doc -> reference answers``.
        image_column: Column holding the (PIL) image.
        category_column: Column whose value is the table category, if any.
        metric_options: ``doc -> extra metric arguments``.
    """

    name: str
    hub_id: str
    config: str | None
    split: str
    metric: str
    prompt: Callable[[dict], str]
    post_prompt: str
    answers: Callable[[dict], list[str]]
    image_column: str = "image"
    category_column: str | None = None
    metric_options: Callable[[dict], dict] = lambda doc: {}


def _letter(doc: dict) -> list[str]:
    """The reference letter of a row whose ``answer`` is the index of the right option."""
    return [string.ascii_uppercase[int(doc["answer"])]]


def _mmbench_prompt(doc: dict) -> str:
    options = [(c, doc[c]) for c in "ABCDE" if doc.get(c) not in (None, "", "nan")]
    text = f"{doc['question']} There are several options:\n{_options(options)}"
    hint = doc.get("hint")
    return f"{hint} {text}" if hint not in (None, "", "nan") else text


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("docvqa_val", "lmms-lab-encoder/DocVQA", "DocVQA", "validation", "anls",
             lambda d: d["question"], SHORT_ANSWER, lambda d: _answers(d["answers"])),
    TaskSpec("infovqa_val", "lmms-lab-encoder/DocVQA", "InfographicVQA", "validation", "anls",
             lambda d: d["question"], SHORT_ANSWER, lambda d: _answers(d["answers"])),
    TaskSpec("chartqa", "lmms-lab-encoder/ChartQA", None, "test", "relaxed_accuracy",
             lambda d: d["question"], "\nAnswer the question with a single word.", lambda d: _answers(d["answer"]),
             category_column="type"),
    TaskSpec("textvqa_val", "lmms-lab-encoder/textvqa", None, "validation", "vqa_accuracy",
             lambda d: d["question"].capitalize(), SHORT_ANSWER, lambda d: _answers(d["answers"])),
    TaskSpec("ocrbench", "echo840/OCRBench", None, "test", "ocrbench",
             lambda d: d["question"].strip(), "", lambda d: _answers(d["answer"]), category_column="question_type",
             metric_options=lambda d: {"handwritten_formula": d.get("dataset") == "HME100k"}),
    # GQA's instruction table holds image ids; lmms-eval joins the "testdev_balanced_images" config
    # on imageId. A dataset saved with an "image" column after that join loads directly.
    TaskSpec("gqa", "lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev", "exact_match",
             lambda d: d["question"], SHORT_ANSWER, lambda d: _answers(d["answer"])),
    TaskSpec("ai2d", "lmms-lab-encoder/ai2d", None, "test", "multiple_choice",
             lambda d: f"{d['question']}\n{_options(_indexed_choices(d, 'options'))}", LETTER_ANSWER,
             _letter, metric_options=lambda d: {"options": len(d["options"])}),
    TaskSpec("scienceqa_img", "lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test", "multiple_choice",
             lambda d: (f"Context: {d['hint']}\n" if d.get("hint") else "")
             + f"{d['question']}\n{_options(_indexed_choices(d, 'choices'))}",
             LETTER_ANSWER, _letter, metric_options=lambda d: {"options": len(d["choices"])}),
    TaskSpec("mmbench_en_dev", "lmms-lab-encoder/MMBench", "en", "dev", "multiple_choice", _mmbench_prompt,
             "\n" + LETTER_ANSWER.lstrip("\n"), lambda d: _answers(d["answer"]), category_column="category",
             metric_options=lambda d: {"options": 5}),
]}


def _require_datasets():
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError("reading benchmarks needs the 'datasets' library: pip install 'visorlib[eval]'") from err
    return datasets


def load_task(name: str, path: str | Path | None = None, split: str | None = None) -> EvalDataset:
    """A benchmark of :data:`TASKS` as evaluation samples.

    Args:
        name: Task name, e.g. ``"docvqa_val"``.
        path: A folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or another
            Hub id / local dataset script folder; default: the spec's Hub id (read from the cache
            when offline).
        split: Split to read (default: the spec's).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    spec = TASKS[name]
    source = str(path or spec.hub_id)
    folder = Path(source)
    saved = ("dataset_info.json", "dataset_dict.json", "state.json")
    if path is not None and folder.is_dir() and not any((folder / f).exists() for f in saved):
        # load_dataset would read the folder as a dataset script / data files and fail with a
        # BuilderConfig error that names neither the folder nor what it should hold.
        raise DataError(f"--data {name}={path}: {path} is not a folder written by Dataset.save_to_disk (it has "
                        f"none of {', '.join(saved)})")
    if path is not None and folder.exists() and not folder.is_dir():
        raise DataError(f"--data {name}={path}: {path} is a file; give a folder written by Dataset.save_to_disk")
    datasets = _require_datasets()
    split = split or spec.split
    if folder.is_dir() and any((folder / f).exists() for f in saved):
        table = datasets.load_from_disk(str(folder))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise ValueError(f"{folder}: no split {split!r} (has: {', '.join(table)})")
            table = table[split]
    else:
        table = datasets.load_dataset(source, spec.config, split=split)
    missing = [c for c in (spec.image_column, spec.category_column) if c and c not in table.column_names]
    if missing:
        raise ValueError(f"{source}: task {name} needs column(s) {missing}; the dataset has {table.column_names}")
    text = table.remove_columns([spec.image_column])  # reading text columns must not decode every image
    samples, problems = [], []
    for index, doc in enumerate(text):
        try:
            answers = spec.answers(doc)
            question = spec.prompt(doc) + spec.post_prompt
            options = spec.metric_options(doc)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            problems.append((index, f"{source}[{index}]: cannot build task {name}'s question/answer: {err!r}"))
            continue
        if not answers:
            problems.append((index, f"{source}[{index}]: no reference answer"))
            continue
        category = doc.get(spec.category_column) if spec.category_column else None
        try:
            samples.append(EvalSample(name, index, source, "<image>\n" + question, answers, spec.metric,
                                      None if category is None else str(category), options,
                                      image_loader=_hf_image_loader(table, spec.image_column, index, source),
                                      image_id=f"{getattr(table, '_fingerprint', source)}/{index}"))
        except DataError as err:
            problems.append((index, str(err)))
    return EvalDataset(name, source, samples, problems)


def _hf_image_loader(table, column: str, index: int, source: str) -> Callable[[], list[Image.Image]]:
    def load() -> list[Image.Image]:
        image = table[index][column]
        if image is None:
            raise DataError(f"{source}[{index}]: the {column!r} column is empty")
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(i, Image.Image) for i in images):
            raise DataError(f"{source}[{index}]: the {column!r} column does not hold images")
        return [i.convert("RGB") for i in images]

    return load


def load_data(spec: str, metric: str = "exact_match", image_root: str | None = None,
              allow_outside_image_root: bool = False) -> EvalDataset:
    """One ``--data`` argument: ``file.json[l]``, ``task`` or ``task=path`` (see :data:`TASKS`)."""
    name, _, path = spec.partition("=")
    if name in TASKS:
        if metric not in METRICS:
            raise DataError(f"--metric {metric!r} is not a metric (known: {', '.join(sorted(METRICS))})")
        return load_task(name, path or None)
    if Path(spec).suffix in (".json", ".jsonl"):
        return load_local(spec, image_root, metric, allow_outside_image_root=allow_outside_image_root)
    raise ValueError(f"--data {spec!r}: expected a .json/.jsonl file, a task name or task=path "
                     f"(tasks: {', '.join(sorted(TASKS))})")
