"""Training recipes: strictly typed YAML, instantiating only what visorlib registers.

A recipe names a zoo model, its data, optimiser, schedule and checkpointing. Every key must be a
field below (a typo is an error naming the key and the file); the only things a recipe can bring
into being are zoo cards (by name), the dataset formats in :data:`DATASET_FORMATS`, and the training
modes here. There is no dotted-path import: a recipe cannot run arbitrary code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, merge_nested, parse_dataclass, read_yaml_mapping

DATASET_FORMATS = ("llava_json", "synthetic")
MODES = ("universal", "independent", "dense")


@dataclass
class ModelSection:
    """Which model to train.

    Attributes:
        name: Zoo card.
        pretrained: None/False (random), True (the card's hub weights), or a folder / hub id.
        overrides: Nested card fields to change (e.g. ``{"decoder": {"num_layers": 4}}``).
        tiny: Use the card's test-size variant (smoke runs, CPU recipes).
    """

    name: str = "visor-llava-ov-0.5b"
    pretrained: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False


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


@dataclass
class DataSection:
    """Data loading.

    Attributes:
        datasets: The mixture.
        max_length: Longest tokenised sample; longer ones follow ``on_error``.
        on_error: ``"skip"`` (report and drop the sample) or ``"raise"``.
        micro_batch_size: Samples per forward on each rank.
        group_by_length: Batch samples of similar length together (less padding).
        tokenizer: Folder or hub id holding ``tokenizer.json`` (default: the model's source).
    """

    datasets: list[DatasetSpec] = field(default_factory=list)
    max_length: int = 4096
    on_error: str = "skip"
    micro_batch_size: int = 1
    group_by_length: bool = True
    tokenizer: str | None = None


@dataclass
class OptimSection:
    """AdamW with warm-up and cosine decay (the paper: no weight decay)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainingSection:
    """What is trained and how.

    Attributes:
        stage: 1 = only VISOR's new parameters; 2 = everything (but the router); ``"router"``.
        mode: ``"universal"`` (one viable configuration sampled per step, the same on every rank),
            ``"independent"`` (always ``configuration``), ``"dense"`` (a dense model).
        configuration: The fixed configuration of independent training.
        global_batch_size: Samples per optimiser step over all ranks (gradient accumulation fills it).
        max_steps: Optimiser steps.
        seed: Seeds data order, configuration sampling and initialisation.
        bf16: Autocast to bfloat16 (CUDA only; ignored on CPU).
        activation_checkpointing: Recompute decoder layers in backward to save memory.
        compile: ``torch.compile`` each decoder layer.
        freeze_vision_tower: Keep the vision tower frozen in stage 2.
    """

    stage: Any = 2
    mode: str = "universal"
    configuration: list[int] | None = None
    global_batch_size: int = 128
    max_steps: int = 1000
    seed: int = 0
    bf16: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    freeze_vision_tower: bool = False


@dataclass
class CheckpointSection:
    """Where and how often to checkpoint (``torch.distributed.checkpoint``, atomic)."""

    dir: str = "checkpoints/run"
    every_steps: int = 500
    keep: int = 2
    export_safetensors: bool = True


@dataclass
class LoggingSection:
    """Progress and metrics."""

    metrics_file: str | None = None
    every_steps: int = 1
    progress: bool = True


@dataclass
class RouterSection:
    """The router stage (``training.stage: router``).

    Attributes:
        labels_file: Configuration log (JSONL); written here when missing, reused when present.
        label_mode: ``"dataset"`` (paper: >= 99 % of the full model, fewest layers, lowest loss) or
            ``"sample"`` (appendix D oracle).
        samples_per_dataset: Samples of each dataset evaluated under every configuration.
        steps: Router optimisation steps (batch size = ``data.micro_batch_size``, lr = ``optim.lr``).
        eval_fraction: Share of labelled samples held out to report router accuracy.
    """

    labels_file: str | None = None
    label_mode: str = "dataset"
    samples_per_dataset: int = 200
    steps: int = 200
    eval_fraction: float = 0.2


@dataclass
class Recipe:
    """A whole training recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    router: RouterSection = field(default_factory=RouterSection)
    source: str = "<recipe>"

    def validate(self) -> Recipe:
        """Cross-field checks the types alone cannot express."""
        where = self.source
        if self.training.stage not in (1, 2, "router"):
            raise ConfigError(f"{where}: training.stage must be 1, 2 or 'router', got {self.training.stage!r}")
        if self.training.mode not in MODES:
            raise ConfigError(f"{where}: training.mode must be one of {MODES}, got {self.training.mode!r}")
        if self.training.mode == "independent" and not self.training.configuration:
            raise ConfigError(f"{where}: training.mode 'independent' needs training.configuration")
        if self.router.label_mode not in ("dataset", "sample"):
            raise ConfigError(f"{where}: router.label_mode must be 'dataset' or 'sample', got {self.router.label_mode!r}")
        if self.data.on_error not in ("skip", "raise"):
            raise ConfigError(f"{where}: data.on_error must be 'skip' or 'raise', got {self.data.on_error!r}")
        for index, spec in enumerate(self.data.datasets):
            if spec.format not in DATASET_FORMATS:
                raise ConfigError(f"{where}: data.datasets[{index}].format must be one of {DATASET_FORMATS}")
            if spec.weight <= 0:
                raise ConfigError(f"{where}: data.datasets[{index}].weight must be > 0")
        if self.checkpoint.keep < 1:
            raise ConfigError(f"{where}: checkpoint.keep must be >= 1 (the newest checkpoint is always kept)")
        if self.training.global_batch_size % self.data.micro_batch_size:
            raise ConfigError(f"{where}: training.global_batch_size must be a multiple of data.micro_batch_size")
        return self


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``key.sub=value`` overrides, validate strictly.

    Args:
        path: The YAML recipe.
        overrides: Command-line style ``section.key=value`` strings (values parsed as YAML).
    """
    import yaml

    data = read_yaml_mapping(path)
    base = Recipe(source=str(path))
    full = {k: v for k, v in _as_dict(base).items() if k != "source"}
    merged = merge_nested(full, data, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = yaml.safe_load(value)
        merged = merge_nested(merged, nested, f"override {item!r}")
    recipe = parse_dataclass(Recipe, merged, str(path))
    recipe.source = str(path)
    return recipe.validate()


def _as_dict(recipe: Recipe) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(recipe)
