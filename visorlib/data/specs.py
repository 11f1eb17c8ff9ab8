"""What names a dataset: the one record both a training recipe and an evaluation read.

A recipe's ``data.datasets`` entries and ``visorlib eval --data`` files are both
:class:`DatasetSpec` s; the record lives here, below :mod:`visorlib.train` and :mod:`visorlib.eval`,
so neither package reaches into the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The formats a :class:`DatasetSpec` can name.
DATASET_FORMATS = ("llava_json", "synthetic")


@dataclass
class DatasetSpec:
    """One dataset of the mixture.

    Attributes:
        path: JSON / JSONL file of LLaVA-style conversations (or a synthetic dataset folder).
        image_root: Folder that image paths are relative to (default: the file's folder).
        weight: Relative sampling weight in the mixture.
        format: One of :data:`DATASET_FORMATS`.
        name: Label used in logs and pseudo-labels (default: the file's stem).
    """

    path: str = ""
    image_root: str | None = None
    weight: float = 1.0
    format: str = "llava_json"
    name: str | None = None
