"""Training data: LLaVA-style conversations, weighted mixtures, length-grouped global batches.

A dataset file is JSON (a list) or JSONL (one object per line) of::

    {"id": ..., "image": "a.jpg" | "images": [...] | "video": [frame files],
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}]}

Image paths are relative to the dataset's ``image_root``. Every sample is reported by file and
index when it is broken (missing or unreadable image, placeholder/image count mismatch, too long);
the recipe's ``on_error`` decides whether that stops training or the sample is replaced by the
next good one — never a silently wrong batch.

The order of samples is a pure function of (seed, step), so every rank knows its slice of any
global batch without communication, and resuming at step ``s`` continues with exactly the batch
an uninterrupted run would have used.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..models.base import InputError
from ..processing.files import DEFAULT_MAX_PIXELS, open_image, resolve_image_path
from .specs import DatasetSpec

log = logging.getLogger("visorlib.train")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A training sample is broken; the message names the file and the index."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON list or a JSONL file."""
    if not path.exists():
        raise DataError(f"dataset file {path} not found")
    if path.is_dir():
        raise DataError(f"dataset file {path} is a folder; give the .json / .jsonl file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        # A latin-1 / cp1252 export: the codec's own message names neither the file nor the fix.
        raise DataError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start}); "
                        "save the file as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        # split("\n"), not splitlines(): a JSON string may hold a raw U+2028, which is not a line end here.
        for number, line in enumerate(text.split("\n"), 1):  # numbered in the file, blank lines included
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON: {err.msg} (column {err.colno})") from err
            if not isinstance(rows[-1], dict):
                raise DataError(f"{path}: line {number} must hold a JSON object, got {type(rows[-1]).__name__}")
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {err}") from err
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of objects")
    return rows


class ConversationDataset(torch.utils.data.Dataset):
    """One dataset of LLaVA-style conversations, encoded by a model's processor.

    Args:
        spec: The recipe's dataset entry.
        processor: The model family's processor (``encode_turns``).
        max_length: Longest allowed sample in tokens.
        on_error: ``"skip"`` or ``"raise"``.
        allow_outside_image_root: Accept image paths that leave the image root.
        max_pixels: Largest image accepted (``width * height``).
        max_consecutive_errors: Broken rows in a row before :meth:`fetch` gives up.
        outside_root_option: What the caller's user sets to allow images outside the root (the
            recipe key for training, a command-line option for evaluation), named in the error.
    """

    def __init__(self, spec: DatasetSpec, processor, max_length: int, on_error: str = "skip", *,
                 allow_outside_image_root: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_consecutive_errors: int | None = None,
                 outside_root_option: str = "data.allow_outside_image_root: true in the recipe"):
        self.path = Path(spec.path)
        if spec.format == "synthetic" and self.path.is_dir():
            self.path = self.path / "data.jsonl"
        self.root = Path(spec.image_root) if spec.image_root else self.path.parent
        self.name = spec.name or self.path.stem
        self.rows = read_rows(self.path)
        if not self.rows:
            raise DataError(f"{self.path}: the dataset is empty")
        self.processor, self.max_length, self.on_error = processor, max_length, on_error
        self.allow_outside, self.max_pixels = allow_outside_image_root, max_pixels
        self.outside_root_option = outside_root_option
        self.max_consecutive_errors = max_consecutive_errors
        self.reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def approx_length(self, index: int) -> int:
        """A cheap length estimate (words + media) used only to group similar samples."""
        row = self.rows[index]
        turns = row.get("conversations")
        words = sum(len(str(t.get("value", "")).split()) for t in turns if isinstance(t, dict)) \
            if isinstance(turns, list) else 0
        try:
            media = len(self.media(index, "images")) + len(self.media(index, "video"))
        except DataError:
            media = 0  # reported, by file and index, when the row is encoded
        return words + 1000 * media

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The encoded sample ``index``, or (``on_error="skip"``) the next good one."""
        sample, skipped = self.fetch(index)
        for current, message in skipped:
            if current not in self.reported:
                self.reported.add(current)
                log.warning("skipping a broken sample: %s", message)
        return sample

    def fetch(self, index: int) -> tuple[dict[str, Any], list[tuple[int, str]]]:
        """The encoded sample ``index`` (or the next good one) and the ``(index, error)`` of every
        broken row passed over on the way, for the caller to report and count.

        Raises:
            DataError: ``on_error="raise"`` and the row is broken; no row could be encoded; or more
                than ``max_consecutive_errors`` rows in a row are broken (a wrong ``image_root``
                makes every row fail: better one clear error than a million warnings).
        """
        skipped: list[tuple[int, str]] = []
        for offset in range(len(self.rows)):
            current = (index + offset) % len(self.rows)
            try:
                return self.encode(current), skipped
            except DataError as err:
                if self.on_error == "raise":
                    raise
                skipped.append((current, str(err)))
                if self.max_consecutive_errors is not None and len(skipped) > self.max_consecutive_errors:
                    raise DataError(f"{self.path}: {len(skipped)} consecutive samples from index {index} are broken "
                                    f"(more than data.max_skip_fraction allows); check the dataset's path and "
                                    f"image_root. First error: {skipped[0][1]}") from err
        raise DataError(f"{self.path}: no sample could be encoded; first error: {skipped[0][1]}")

    def media(self, index: int, key: str) -> list[str]:
        """File names of row ``index``'s ``"images"`` (``image`` or ``images``) or ``"video"`` frames.

        Raises:
            DataError: The field is not a file name or a list of file names (``"image": 5``, or
                ``{"path": ...}`` whose key would otherwise be read as a file name).
        """
        row = self.rows[index]
        field = next((k for k in ("images", "image") if k in row), "images") if key == "images" else "video"
        value = row.get(field)
        if value is None:
            return []
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise DataError(f"{self.path}[{index}]: {field!r} must be a file name or a list of file names, "
                            f"got {type(value).__name__} {shown}")
        return names

    def _open(self, index: int, relative: str) -> Image.Image:
        if not self.allow_outside:
            try:
                resolve_image_path(relative, self.root)
            except InputError:  # the advice must name what *this* caller's user can set
                real = (self.root / relative).resolve()
                raise DataError(f"{self.path}[{index}]: image {relative} resolves to {real}, outside the image "
                                f"root {self.root.resolve()}; set {self.outside_root_option} to allow it") from None
        try:
            # The image's own mode is kept: the processors convert 16-bit / float modes to RGB correctly.
            return open_image(relative, root=self.root, allow_outside=self.allow_outside, max_pixels=self.max_pixels)
        except InputError as err:
            raise DataError(f"{self.path}[{index}]: {err}") from err

    def encode(self, index: int) -> dict[str, Any]:
        """Encode row ``index`` (raises :class:`DataError` naming file and index when broken)."""
        row = self.rows[index]
        turns = []
        conversations = row.get("conversations") or []
        if not isinstance(conversations, list):
            raise DataError(f"{self.path}[{index}]: 'conversations' must be a list of turns, "
                            f"got {type(conversations).__name__}")
        for position, turn in enumerate(conversations):
            role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise DataError(f"{self.path}[{index}]: conversation turn {position} needs 'from' in "
                                f"{sorted(ROLES)} and a string 'value'")
            turns.append((role, turn["value"]))
        if not any(role == "assistant" for role, _ in turns):
            raise DataError(f"{self.path}[{index}]: no assistant ('gpt') turn to learn from")
        images = [self._open(index, p) for p in self.media(index, "images")]
        frames = self.media(index, "video")
        videos = [[self._open(index, p) for p in frames]] if frames else []
        try:
            sample = self.processor.encode_turns(turns, images, videos)
        except ValueError as err:
            raise DataError(f"{self.path}[{index}]: {err}") from err
        length = sample["input_ids"].shape[0]
        if length > self.max_length:
            raise DataError(f"{self.path}[{index}]: {length} tokens is longer than max_length={self.max_length}")
        sample["dataset"], sample["index"] = self.name, index
        sample["category"] = row.get("category")
        return sample


@dataclass
class BatchPlan:
    """Which samples form the global batch of every step (deterministic in seed and step).

    Each epoch draws ``sum(len(dataset))`` samples, picking the dataset by ``weights`` and walking
    each dataset's own shuffled order; with ``group_by_length`` the epoch is cut into windows of
    32 global batches whose samples are sorted by length before being cut into batches, and the
    batch order is shuffled again.
    """

    datasets: list[ConversationDataset]
    weights: list[float]
    global_batch_size: int
    seed: int = 0
    group_by_length: bool = True

    def __post_init__(self):
        self._epochs: dict[int, list[list[tuple[int, int]]]] = {}
        self.epoch_samples = sum(len(d) for d in self.datasets)

    def _epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        if epoch not in self._epochs:
            rng = random.Random(f"{self.seed}-{epoch}")
            orders = [rng.sample(range(len(d)), len(d)) for d in self.datasets]
            cursors = [0] * len(self.datasets)
            refs = []
            for _ in range(self.epoch_samples):
                which = rng.choices(range(len(self.datasets)), weights=self.weights)[0]
                refs.append((which, orders[which][cursors[which] % len(orders[which])]))
                cursors[which] += 1
            size = self.global_batch_size
            if self.group_by_length:
                window = 32 * size
                grouped = []
                for start in range(0, len(refs), window):
                    chunk = sorted(refs[start:start + window], key=lambda r: self.datasets[r[0]].approx_length(r[1]))
                    grouped += chunk
                refs = grouped
            batches = [refs[i:i + size] for i in range(0, self.batches_per_epoch * size, size)]
            rng.shuffle(batches)
            self._epochs = {epoch: batches}  # keep only the current epoch in memory
        return self._epochs[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches in one epoch (the remainder of an epoch is dropped)."""
        if self.epoch_samples < self.global_batch_size:
            raise DataError(f"the data holds {self.epoch_samples} samples, fewer than one global batch of "
                            f"{self.global_batch_size}")
        return self.epoch_samples // self.global_batch_size

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """``(dataset, index)`` references of the global batch of optimiser step ``step``."""
        per_epoch = self.batches_per_epoch
        return self._epoch(step // per_epoch)[step % per_epoch]


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of encoded samples into model inputs (labels padded with -100)."""
    length = max(s["input_ids"].shape[0] for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[0]
        ids[row, :n], labels[row, :n], mask[row, :n] = sample["input_ids"], sample["labels"], 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # Vision tensors of any family: concatenated over samples; LLaVA's [images, tiles, ...] are
    # zero-padded to the most tiles first (the model reads only each image's own tiles).
    keys = [k for k in samples[0] if isinstance(samples[0][k], torch.Tensor) and k not in ("input_ids", "labels")]
    keys += [k for s in samples for k in s if isinstance(s[k], torch.Tensor) and k not in keys + ["input_ids", "labels"]]
    for key in dict.fromkeys(keys):
        parts = [s[key] for s in samples if key in s]
        if key == "pixel_values" and parts[0].dim() == 5:
            tiles = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
        batch[key] = torch.cat(parts)
    if "image_sizes" in batch:
        batch["batch_num_images"] = torch.tensor([s["image_sizes"].shape[0] for s in samples if "image_sizes" in s])
    return batch


class StepBatches(torch.utils.data.Dataset):
    """Item ``(step, k)``: micro-batch ``k`` of this rank's share of step ``step``'s global batch.

    This is what the trainer's ``DataLoader`` reads: each item is decoded, tiled and collated in
    a worker process while the model trains on earlier ones, and because the item is a pure
    function of its key (the :class:`BatchPlan` order), any number of workers produces exactly
    the batches of ``num_workers=0`` — and a resumed run those of an uninterrupted one.

    Broken samples are not logged here (a worker's log and state are not the trainer's): the
    item carries them (``skipped``) and how many rows were read, and a :class:`SkipMonitor` in
    the training process reports and counts them in step order. Errors travel as text
    (``error``) so they reach the user as one clean message rather than a worker traceback.
    """

    def __init__(self, datasets: list[ConversationDataset], plan: BatchPlan, rank: int, world: int,
                 micro_batch_size: int, pad_id: int):
        self.datasets, self.plan = datasets, plan
        self.rank, self.world, self.micro, self.pad_id = rank, world, micro_batch_size, pad_id

    def refs(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of ``(dataset, index)`` references for ``step``."""
        refs = self.plan.global_batch(step)
        per_rank = len(refs) // self.world
        mine = refs[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[k:k + self.micro] for k in range(0, len(mine), self.micro)]

    def micro_batches_per_step(self) -> int:
        return self.plan.global_batch_size // self.world // self.micro

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, k = key
        out: dict[str, Any] = {"step": step, "micro": k, "skipped": [], "read": 0, "error": None, "batch": None}
        try:
            samples = []
            for d, i in self.refs(step)[k]:
                sample, skipped = self.datasets[d].fetch(i)
                out["skipped"] += [(d, index, message) for index, message in skipped]
                out["read"] += 1 + len(skipped)
                samples.append(sample)
            out["batch"] = collate(samples, self.pad_id)
        except DataError as err:
            out["error"] = str(err)
        return out


class StepSampler(torch.utils.data.Sampler):
    """The keys ``(step, k)`` of steps ``start .. stop - 1``, in training order."""

    def __init__(self, start: int, stop: int, per_step: int):
        self.start, self.stop, self.per_step = start, stop, per_step

    def __iter__(self):
        for step in range(self.start, self.stop):
            for k in range(self.per_step):
                yield (step, k)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.per_step


def identity(item: Any) -> Any:
    """The loader's ``collate_fn``: items are collated micro-batches already (module level: picklable)."""
    return item


class SkipMonitor:
    """Reports broken samples once each and stops training when too many are broken.

    Args:
        datasets: The datasets (for their names in messages).
        max_fraction: Largest accepted share of broken rows among the rows read (``data.max_skip_fraction``).
        check_after: Rows read before the share is enforced (``data.skip_check_after``).
    """

    def __init__(self, datasets: list[ConversationDataset], max_fraction: float, check_after: int):
        self.datasets, self.max_fraction, self.check_after = datasets, max_fraction, check_after
        self.read = self.skipped = 0
        self.reported: set[tuple[int, int]] = set()
        self.first: str | None = None

    def record(self, items: list[dict[str, Any]]) -> tuple[int, int]:
        """Log the broken samples of a step's items; returns the step's ``(read, skipped)`` counts.

        Raises:
            DataError: An item could not be built (its message, as the worker wrote it).
        """
        read = skipped = 0
        for item in items:
            if item["error"] is not None:
                raise DataError(item["error"])
            read, skipped = read + item["read"], skipped + len(item["skipped"])
            for d, index, message in item["skipped"]:
                self.first = self.first or message
                if (d, index) not in self.reported:
                    self.reported.add((d, index))
                    log.warning("skipping a broken sample: %s", message)
        return read, skipped

    def check(self, read: int, skipped: int) -> None:
        """Add a step's counts (summed over ranks) and raise once the broken share is too high.

        Raises:
            DataError: More than ``max_fraction`` of at least ``check_after`` rows were broken.
        """
        self.read, self.skipped = self.read + int(read), self.skipped + int(skipped)
        if self.read >= self.check_after and self.skipped > self.max_fraction * self.read:
            names = ", ".join(str(d.path) for d in self.datasets)
            raise DataError(f"{self.skipped} of the {self.read} samples read so far are broken "
                            f"({self.skipped / self.read:.0%}, more than data.max_skip_fraction="
                            f"{self.max_fraction}); check the paths and image_root of {names}. "
                            f"First error: {self.first}")
