"""Training recipes: strictly typed YAML, instantiating only what visorlib registers.

A recipe names a zoo model, its data, optimiser, schedule and checkpointing. Every key must be a
field below (a typo is an error naming the key and the file); the only things a recipe can bring
into being are zoo cards (by name), the dataset formats in :data:`DATASET_FORMATS`, and the training
modes here. There is no dotted-path import: a recipe cannot run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, merge_nested, parse_dataclass, read_yaml_mapping
from ..data.specs import DATASET_FORMATS, DatasetSpec
from ..processing.files import DEFAULT_MAX_PIXELS

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
class DataSection:
    """Data loading.

    Attributes:
        datasets: The mixture.
        max_length: Longest tokenised sample; longer ones follow ``on_error``.
        on_error: ``"skip"`` (report and drop the sample) or ``"raise"``.
        micro_batch_size: Samples per forward on each rank.
        group_by_length: Batch samples of similar length together (less padding).
        tokenizer: Folder or hub id holding ``tokenizer.json`` (default: the model's source).
        max_skip_fraction: With ``on_error: skip``, stop training once more than this share of the
            samples read so far was broken (a wrong ``image_root`` must not skip every row).
        skip_check_after: Samples read before ``max_skip_fraction`` is enforced (a few broken rows
            at the very start are not yet a trend).
        allow_outside_image_root: Accept image paths that leave ``image_root`` (``..``, absolute
            paths elsewhere, symbolic links out of it).
        max_pixels: Largest image (width x height) read; larger files are broken samples
            (decompression-bomb guard). ``null``: only PIL's own limit.
        num_workers: ``DataLoader`` worker processes decoding and tiling images while the model
            steps (0: in the training process).
        prefetch_factor: Micro-batches each worker prepares ahead (``null``: torch's default, 2);
            only with ``num_workers > 0``.
        pin_memory: Page-lock batches for faster host-to-GPU copies (only used on CUDA).
    """

    datasets: list[DatasetSpec] = field(default_factory=list)
    max_length: int = 4096
    on_error: str = "skip"
    micro_batch_size: int = 1
    group_by_length: bool = True
    tokenizer: str | None = None
    max_skip_fraction: float = 0.1
    skip_check_after: int = 32
    allow_outside_image_root: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool = True


@dataclass
class OptimSection:
    """AdamW with warm-up and cosine decay (the paper: no weight decay).

    Attributes:
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW's two moment coefficients, each in [0, 1).
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: The cosine decays to this share of ``lr`` (0 to 1).
        grad_clip: Clip the global gradient norm to this; ``null`` or 0: no clipping.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0


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
        threads: ``torch.set_num_threads`` for the training process (``null``: leave torch's
            choice; on a small shared machine 1 is right).
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
    threads: int | None = None


@dataclass
class CheckpointSection:
    """Where and how often to checkpoint (``torch.distributed.checkpoint``, atomic).

    Attributes:
        dir: The run folder; one training at a time may write into it (a lock file guards it).
        every_steps: Save every N optimiser steps (and at the last step).
        keep: Complete checkpoints kept (the newest always).
        export_safetensors: Also write a loadable ``model/`` folder into each checkpoint.
    """

    dir: str = "checkpoints/run"
    every_steps: int = 500
    keep: int = 2
    export_safetensors: bool = True


@dataclass
class LoggingSection:
    """Progress and metrics.

    Attributes:
        metrics_file: Append one JSON line of metrics per logged step here.
        every_steps: Log every N steps.
        progress: Show a progress bar.
    """

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
        train_token: Also train the routing token's embedding (default False: only the router's
            MLP learns, so the model's answers under each fixed configuration stay as they were).
    """

    labels_file: str | None = None
    label_mode: str = "dataset"
    samples_per_dataset: int = 200
    steps: int = 200
    eval_fraction: float = 0.2
    train_token: bool = False


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
        """Value and cross-field checks the types alone cannot express.

        Every message names the file, the key, the allowed range and the value found, so a recipe
        that would fail (or silently do something else) after hours of training fails at load time.
        """
        where = self.source

        def need(ok: bool, key: str, allowed: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f"{where}: {key} must be {allowed}, got {value!r}")

        train, data, opt = self.training, self.data, self.optim
        need(train.stage in (1, 2, "router"), "training.stage", "1, 2 or 'router'", train.stage)
        need(train.mode in MODES, "training.mode", f"one of {MODES}", train.mode)
        # [] is a configuration (cross-attention only), so only a missing one is refused.
        if train.mode == "independent" and train.configuration is None:
            raise ConfigError(f"{where}: training.mode 'independent' needs training.configuration "
                              "(a list of SA layers; [] = cross-attention only)")
        need(self.router.label_mode in ("dataset", "sample"), "router.label_mode", "'dataset' or 'sample'",
             self.router.label_mode)
        need(data.on_error in ("skip", "raise"), "data.on_error", "'skip' or 'raise'", data.on_error)
        for index, spec in enumerate(data.datasets):
            key = f"data.datasets[{index}]"
            need(spec.format in DATASET_FORMATS, f"{key}.format", f"one of {DATASET_FORMATS}", spec.format)
            # A llava_json file that is a folder fails later with a bare '[Errno 21]' naming no key.
            if spec.format == "llava_json" and spec.path and Path(spec.path).is_dir():
                raise ConfigError(f"{where}: {key}.path {spec.path} is a folder; a llava_json dataset is one "
                                  "JSON / JSONL file (format: synthetic reads a folder written by visorlib data synth)")
            need(spec.weight > 0 and math.isfinite(spec.weight), f"{key}.weight", "a number > 0", spec.weight)
        positive = {"training.global_batch_size": train.global_batch_size, "data.micro_batch_size": data.micro_batch_size,
                    "training.max_steps": train.max_steps, "checkpoint.every_steps": self.checkpoint.every_steps,
                    "logging.every_steps": self.logging.every_steps, "data.max_length": data.max_length,
                    "data.skip_check_after": data.skip_check_after, "router.samples_per_dataset":
                    self.router.samples_per_dataset, "router.steps": self.router.steps}
        for key, value in positive.items():
            need(value >= 1, key, "an integer >= 1", value)
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "an integer >= 1 (the newest checkpoint is always kept)",
             self.checkpoint.keep)
        for key, value in {"training.threads": train.threads, "data.max_pixels": data.max_pixels,
                           "data.prefetch_factor": data.prefetch_factor}.items():
            need(value is None or value >= 1, key, "an integer >= 1 or null", value)
        need(data.num_workers >= 0, "data.num_workers", "an integer >= 0", data.num_workers)
        # torch.manual_seed takes 64 bits; a larger seed overflowed deep inside model building.
        need(0 <= train.seed < 2**63, "training.seed", "an integer in [0, 2**63)", train.seed)
        for key, value in {"logging.metrics_file": self.logging.metrics_file,
                           "router.labels_file": self.router.labels_file}.items():
            if value and Path(value).is_dir():
                raise ConfigError(f"{where}: {key} {value} is a folder; name a file (e.g. {Path(value) / 'x.jsonl'})")
        if self.checkpoint.dir and Path(self.checkpoint.dir).is_file():
            raise ConfigError(f"{where}: checkpoint.dir {self.checkpoint.dir} is a file, not a folder")
        if data.num_workers == 0:
            need(data.prefetch_factor is None, "data.prefetch_factor", "null when data.num_workers is 0 "
                 "(only worker processes prefetch)", data.prefetch_factor)
        need(0 <= data.max_skip_fraction <= 1, "data.max_skip_fraction", "between 0 and 1", data.max_skip_fraction)
        need(opt.lr > 0 and math.isfinite(opt.lr), "optim.lr", "a number > 0", opt.lr)
        need(opt.weight_decay >= 0, "optim.weight_decay", "a number >= 0", opt.weight_decay)
        need(opt.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", opt.warmup_steps)
        need(0 <= opt.min_lr_ratio <= 1, "optim.min_lr_ratio", "between 0 and 1 (a share of optim.lr)",
             opt.min_lr_ratio)
        # A negative clip norm multiplies the gradients by a negative factor: training would ascend.
        need(opt.grad_clip is None or opt.grad_clip >= 0, "optim.grad_clip", "a number >= 0, or null (no clipping)",
             opt.grad_clip)
        need(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), "optim.betas",
             "exactly two numbers in [0, 1), e.g. [0.9, 0.999]", opt.betas)
        need(0 <= self.router.eval_fraction < 1, "router.eval_fraction", "in [0, 1)", self.router.eval_fraction)
        if train.global_batch_size % data.micro_batch_size:
            raise ConfigError(f"{where}: training.global_batch_size must be a multiple of data.micro_batch_size, "
                              f"got {train.global_batch_size} and {data.micro_batch_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what a checkpoint's ``trainer.json`` records), ``source`` excluded."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


#: Recipe fields a resumed run may change without ``allow_recipe_change``: they do not change what
#: is computed (how long, how often it is logged or saved, how data is loaded, CPU threads) —
#: ``checkpoint.dir`` is the folder being resumed from, so it may have moved.
RESUMABLE_CHANGES = ("training.max_steps", "training.threads", "logging.", "checkpoint.dir", "checkpoint.keep",
                     "checkpoint.every_steps", "checkpoint.export_safetensors", "data.num_workers",
                     "data.prefetch_factor", "data.pin_memory", "data.max_skip_fraction", "data.skip_check_after")


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every field that differs, ignoring :data:`RESUMABLE_CHANGES`."""
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(flat_saved) | set(flat_now)):
        if any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES):
            continue
        before, after = flat_saved.get(key, "<absent>"), flat_now.get(key, "<absent>")
        if before != after:
            out.append(f"{key}: {before!r} -> {after!r}")
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        # Free-form mappings (model.overrides) are compared whole, like lists.
        if isinstance(value, dict) and key != "overrides":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``key.sub=value`` overrides, resolve paths, validate strictly.

    Relative paths written in the file are relative to the file's folder (see
    :func:`resolve_paths`); paths given in ``overrides`` are relative to the current directory,
    like any command-line path.

    Args:
        path: The YAML recipe.
        overrides: Command-line style ``section.key=value`` strings (values parsed with
            ``yaml.safe_load``, the same loader as the file).

    Raises:
        ConfigError: Unknown key, wrong type or out-of-range value (naming key and file), or a
            malformed override (naming the override).
    """
    data = read_yaml_mapping(path)
    merged = merge_nested(Recipe().to_dict(), data, str(path))
    overridden = []
    for item in overrides or []:
        key, value = parse_override(item)
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        merged = merge_nested(merged, nested, f"override {item!r}")
        overridden.append(key)
    recipe = parse_dataclass(Recipe, merged, str(path))
    recipe.source = str(path)
    # Absolute: the recipe recorded in a checkpoint must not depend on the directory a run started in.
    resolve_paths(recipe, Path(path).absolute().parent, skip=overridden)
    recipe.validate()
    check_configuration(recipe)
    return recipe


def model_config(recipe: Recipe):
    """The card a recipe trains: ``model.name``, shrunk when ``model.tiny``, with ``model.overrides``."""
    from .. import zoo

    spec = recipe.model
    cfg = zoo.get_config(spec.name)
    if spec.tiny:
        cfg = cfg.tiny()
    if spec.overrides:
        cfg = cfg.with_overrides(spec.overrides, f"{recipe.source}: model.overrides")
    return cfg


def check_configuration(recipe: Recipe, plan=None) -> None:
    """Refuse a ``training.configuration`` the model's layer plan cannot run, naming the key.

    Checked when the recipe is loaded (against the card, before minutes of model building) and
    again against the built model (a ``model.pretrained`` checkpoint brings its own architecture).
    ``[]`` is a configuration too: cross-attention only.

    Args:
        recipe: The recipe.
        plan: The built model's :class:`~visorlib.visor.plan.LayerPlan`; None: the card's.

    Raises:
        ConfigError: A layer out of range, repeated or not a self-attention candidate.
    """
    from ..validation import LayerChoiceError
    from ..visor.plan import LayerPlan

    configuration = recipe.training.configuration
    if configuration is None or recipe.training.mode == "dense":
        return
    if plan is None:
        pretrained = recipe.model.pretrained
        if isinstance(pretrained, str) and (Path(pretrained) / "visorlib.json").exists():
            return  # the checkpoint's architecture decides; checked once it is built
        cfg = model_config(recipe)
        if cfg.visor is None:
            return  # a dense card visorized later has no plan yet
        plan = LayerPlan(cfg.decoder.num_layers, cfg.visor)
    try:
        plan.validate(configuration, "training.configuration")
    except LayerChoiceError as err:
        raise ConfigError(f"{recipe.source}: {err}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``, the value read by ``yaml.safe_load``.

    Raises:
        ConfigError: No ``=``, an empty key part, or a value that is not valid (safe) YAML — a
            ``!!python/...`` tag included — naming the override.
    """
    import yaml

    from ..config import safe_load_unique

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"override {item!r}: the key {key!r} must be dotted names like training.max_steps")
    try:
        return key.strip(), safe_load_unique(text)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"override {item!r}: the value is not valid YAML (tags are not allowed): {detail}") from err


def _is_local(value: str, base: Path) -> bool:
    """Whether a tokenizer / pretrained value names a local path rather than a Hub id."""
    return value.startswith(("./", "../", "/", "~")) or (base / value).exists()


def resolve_paths(recipe: Recipe, base: Path, skip: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Make the recipe's relative paths relative to ``base`` (the recipe file's folder).

    A recipe then means the same thing whatever directory the command runs from. Resolved:
    ``data.datasets[*].path`` and ``image_root``, ``checkpoint.dir``, ``logging.metrics_file``,
    ``router.labels_file``; ``data.tokenizer`` and ``model.pretrained`` only when they are local
    paths (start with ``./``, ``../``, ``/`` or ``~``, or exist under ``base``), since otherwise
    they are Hub ids. Keys in ``skip`` (set on the command line) and keys under them are left alone.
    """
    def keep(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in skip)

    def join(value: str) -> str:
        path = Path(value).expanduser()
        return path.as_posix() if path.is_absolute() else os.path.normpath(base / path)

    if not keep("data.datasets"):
        for spec in recipe.data.datasets:
            spec.path = join(spec.path) if spec.path else spec.path
            spec.image_root = join(spec.image_root) if spec.image_root else spec.image_root
    for section, name in (("checkpoint", "dir"), ("logging", "metrics_file"), ("router", "labels_file")):
        value = getattr(getattr(recipe, section), name)
        if value and not keep(f"{section}.{name}"):
            setattr(getattr(recipe, section), name, join(value))
    if recipe.data.tokenizer and not keep("data.tokenizer") and _is_local(recipe.data.tokenizer, base):
        recipe.data.tokenizer = join(recipe.data.tokenizer)
    pretrained = recipe.model.pretrained
    if isinstance(pretrained, str) and not keep("model.pretrained") and _is_local(pretrained, base):
        recipe.model.pretrained = join(pretrained)
    return recipe
