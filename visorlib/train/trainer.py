"""The trainer: one process or many (``torchrun`` + FSDP2), universal VISOR training, exact resume.

Stage 1 trains only VISOR's new parameters (cross-attention blocks, and the widened projector of
token packing); stage 2 trains everything but the router (paper §5.1). Universal training samples
one viable configuration per optimiser step from (seed, step), so every rank picks the same one
without talking (§4.2.3). The loss is the mean next-token cross-entropy over all supervised tokens
of the global batch, however it is split into ranks and micro-batches, so one process with the
same global batch computes the same numbers.

Checkpoints use ``torch.distributed.checkpoint`` (sharded, reshardable) into a temporary folder
that is renamed into place only when complete; a ``latest`` file then points at it. A crash
mid-save leaves the previous checkpoint as the latest; ``resume`` continues bit-exactly because
the data order, the configuration and the learning rate are functions of the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)

from .. import zoo
from ..config import ConfigError
from ..data.conversations import (
    BatchPlan,
    ConversationDataset,
    SkipMonitor,
    StepBatches,
    StepSampler,
    identity,
)
from ..data.runlock import RunDirError, RunLock, check_writable
from ..hub import CheckpointError, atomic_write_json, write_checkpoint
from ..models import family_of, set_train_mode
from .distributed import Distributed, quiet_single_process
from .recipe import Recipe, check_configuration, model_config, recipe_differences
from .stops import TrainingInterrupted, disk_full, reason, stop_on_sigint

log = logging.getLogger("visorlib.train")


def configuration_for_step(plan, mode: str, fixed: list[int] | None, seed: int, step: int) -> list[int] | None:
    """The configuration of an optimiser step: a pure function of (seed, step), so all ranks agree."""
    if mode == "dense" or plan is None or plan.dense:
        return None
    if mode == "independent":
        return list(fixed)
    return list(random.Random(f"{seed}-configuration-{step}").choice(plan.configurations))


def freeze_for_stage(model, stage, freeze_vision_tower: bool = False) -> dict[str, torch.nn.Parameter]:
    """Let exactly the parameters training ``stage`` updates learn, and freeze the rest; returns them by name.

    What a stage trains is the model's own answer
    (:meth:`~visorlib.models.base.VisionLanguageModel.parameters_for`), not name prefixes.
    """
    trainable = model.parameters_for(stage, freeze_vision_tower)
    chosen = {id(p) for p in trainable.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return trainable


_PARTS = ("decoder.", "cross_attention.", "router.", "packer.")


def _flat_name(name: str) -> str:
    return name.removeprefix("language_model.")


def _nested_name(name: str) -> str:
    return "language_model." + name if name.startswith(_PARTS) else name


def _optimizer_names(optim: dict[str, Any], rename) -> dict[str, Any]:
    """An optimizer state dict (DCP's parameter-name form) with every parameter name renamed."""
    groups = [{**group, "params": [rename(p) for p in group["params"]]} for group in optim["param_groups"]]
    return {"state": {rename(k): v for k, v in optim["state"].items()}, "param_groups": groups}


def _saved_with_flat_names(path: Path) -> bool:
    """Whether a DCP checkpoint keys its optimizer entries by the pre-issue-20 names (``decoder.*``)."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith(tuple("optim.state." + p for p in _PARTS)) for k in keys)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(recipe: Recipe, device: torch.device):
    """The recipe's model (tiny, overridden, pretrained as asked), seeded for identical ranks."""
    spec = recipe.model
    torch.manual_seed(recipe.training.seed)
    cfg = model_config(recipe)
    if spec.pretrained:
        if spec.pretrained is not True and (Path(spec.pretrained) / "visorlib.json").exists():
            # A visorlib checkpoint carries its own architecture; a dense one becomes the card's VISOR model.
            model = zoo.from_pretrained(spec.pretrained, device=device)
            if model.cfg.visor is None and cfg.visor is not None:
                model = zoo.dense_to_visor(model, cfg.visor, spec.pretrained, warn=False)  # this run fine-tunes it
            return model
        return zoo.build(spec.name, pretrained=spec.pretrained, device=device, **spec.overrides)
    return zoo.instantiate(cfg, device)


def training_processor(model, recipe: Recipe):
    """The model's processor with a tokenizer: ``data.tokenizer``, else the checkpoint folder, else
    the card's hub id (through the Hub cache). Training without a tokenizer is a clear error."""
    from ..zoo import processor_for

    if recipe.data.tokenizer:
        return family_of(model.cfg).processor(model.cfg, recipe.data.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "images only" warning becomes the error below
        processor = processor_for(model)
    if processor.tokenizer is None:
        raise ValueError(f"{recipe.source}: no tokenizer found for {model.cfg.name} (not in the checkpoint folder, "
                         "no hub_id in the Hub cache): set data.tokenizer to a folder or hub id with tokenizer.json")
    return processor


def save_tokenizer(processor, folder: Path) -> None:
    """Put the tokenizer beside exported weights, so the export is a complete, loadable model."""
    if processor.tokenizer is not None:
        folder.mkdir(parents=True, exist_ok=True)
        processor.tokenizer.backend.save(str(folder / "tokenizer.json"))


def _logged_step(line: str) -> float:
    """The step of a metrics line (infinite for a broken line, so it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class Trainer:
    """Runs a :class:`Recipe`.

    Args:
        recipe: The parsed recipe.
        resume: Continue from the latest complete checkpoint in ``checkpoint.dir`` if there is one.
        allow_recipe_change: On resume, accept a recipe that differs from the checkpoint's in more
            than the fields of :data:`~visorlib.train.recipe.RESUMABLE_CHANGES` (the differences are
            logged instead of raised).
        status: Called with a short line before each slow start-up phase (the CLI prints them, so a
            user sees what the seconds before the progress bar are spent on).

    Raises:
        RunDirError: ``checkpoint.dir`` (or the metrics file's folder) is not writable, another
            training holds its lock, or — without ``resume`` — it holds an earlier run's
            checkpoints (they are never overwritten silently) — before the model is built.
        ConfigError: ``resume`` and the recipe differs from the checkpoint's (see above), or the
            checkpoint is past ``training.max_steps``.
        CheckpointError: ``resume`` and the checkpoint does not fit the model built from the recipe.
    """

    def __init__(self, recipe: Recipe, resume: bool = False, allow_recipe_change: bool = False,
                 status: Callable[[str], None] | None = None):
        recipe.validate()  # recipes built in Python get the checks load_recipe applies
        self.recipe, self.dist = recipe, Distributed()
        say = status if status is not None and self.dist.main else (lambda _line: None)
        self.interrupted = False
        train = recipe.training
        if train.threads is not None:
            torch.set_num_threads(train.threads)
        self.ckpt_dir = Path(recipe.checkpoint.dir)
        self.lock = RunLock(self.ckpt_dir, owner=f"recipe {recipe.source}")
        self._holding = False
        if self.dist.main:
            check_writable(self.ckpt_dir, "checkpoint.dir", recipe.source)
            if recipe.logging.metrics_file:
                check_writable(Path(recipe.logging.metrics_file).parent, "logging.metrics_file's folder", recipe.source)
        with self._locked():  # refused now, before minutes of model building, if another run holds the folder
            pass
        if not resume and (previous := self.latest_checkpoint()) is not None and recipe.training.stage != "router":
            # Training from step 0 would write step_1.. beside (and prune) the earlier run's checkpoints.
            raise RunDirError(f"{recipe.source}: checkpoint.dir {self.ckpt_dir} holds an earlier run's checkpoints "
                              f"(up to {previous.name}); continue it with --resume (Trainer(..., resume=True)), or "
                              "choose another checkpoint.dir, or move that folder away to start over")
        say(f"building {recipe.model.name}{' (tiny)' if recipe.model.tiny else ''}"
            f"{' from ' + str(recipe.model.pretrained) if recipe.model.pretrained else ''} on {self.dist.device}...")
        self.model = build_model(recipe, self.dist.device)
        check_configuration(recipe, getattr(self.model, "plan", None))
        freeze_for_stage(self.model, train.stage, train.freeze_vision_tower)
        for layer in self.model.decoder.layers:
            layer.gradient_checkpointing = train.activation_checkpointing
            if train.compile:
                layer.compile()
        if self.dist.world > 1:
            self._shard()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{recipe.source}: training.stage={train.stage!r} leaves nothing to train for this model")
        opt = recipe.optim
        self.optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, opt.warmup_steps, train.max_steps, opt.min_lr_ratio)
        )
        say(f"loading the tokenizer and indexing {len(recipe.data.datasets)} dataset(s)...")
        self.processor = training_processor(self.model, recipe)
        data = recipe.data
        # Without a ceiling on the share of broken rows (max_skip_fraction 1) a walk may cross the whole file.
        consecutive = data.skip_check_after if data.max_skip_fraction < 1 else None
        self.datasets = [ConversationDataset(spec, self.processor, data.max_length, data.on_error,
                                             allow_outside_image_root=data.allow_outside_image_root,
                                             max_pixels=data.max_pixels, max_consecutive_errors=consecutive)
                         for spec in data.datasets]
        if not self.datasets:
            raise ValueError(f"{recipe.source}: data.datasets is empty")
        self.plan = BatchPlan(self.datasets, [d.weight for d in data.datasets], train.global_batch_size,
                              train.seed, data.group_by_length)
        if train.global_batch_size % (self.dist.world * data.micro_batch_size):
            raise ValueError(f"{recipe.source}: global_batch_size {train.global_batch_size} is not divisible by "
                             f"world size {self.dist.world} x micro_batch_size {data.micro_batch_size}")
        pad = self.processor.tokenizer.pad_token_id if self.processor.tokenizer.pad_token_id is not None else 0
        self.step_batches = StepBatches(self.datasets, self.plan, self.dist.rank, self.dist.world,
                                        data.micro_batch_size, pad)
        self.skips = SkipMonitor(self.datasets, data.max_skip_fraction, data.skip_check_after)
        self.step = 0
        if resume:
            say(f"resuming from the latest checkpoint in {self.ckpt_dir}...")
            self.resume(allow_recipe_change=allow_recipe_change)

    def _shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for module in [*self.model.decoder.layers, *(self.model.cross_attention or {}).values(), self.model.vision_tower]:
            fully_shard(module)
        fully_shard(self.model)

    @contextmanager
    def _locked(self):
        """Hold the run-folder lock (rank 0 takes it; every rank learns whether that worked).

        Re-entrant (a save inside :meth:`train`); ``_holding`` is tracked on every rank, not only
        the one holding the file lock, so all ranks take the same path through the collective.
        """
        if self._holding:
            yield
            return
        error = None
        if self.dist.main:
            try:
                self.lock.acquire()
            except RunDirError as err:
                error = err
        if self.dist.sum(1.0 if error else 0.0):
            raise error or RunDirError(f"rank 0 could not lock checkpoint.dir {self.ckpt_dir}")
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            self.lock.release()

    # ------------------------------------------------------------------ data
    def data_loader(self, start: int, stop: int) -> torch.utils.data.DataLoader:
        """Micro-batches of steps ``start .. stop - 1`` in training order, prepared by ``data.num_workers``
        worker processes ahead of the step that needs them."""
        data = self.recipe.data
        kwargs: dict[str, Any] = {}
        if data.num_workers:
            kwargs["prefetch_factor"] = data.prefetch_factor or 2
        return torch.utils.data.DataLoader(
            self.step_batches, batch_size=None, collate_fn=identity, num_workers=data.num_workers,
            sampler=StepSampler(start, stop, self.step_batches.micro_batches_per_step()),
            pin_memory=data.pin_memory and self.dist.device.type == "cuda", **kwargs)

    def _step_items(self) -> list[dict[str, Any]]:
        return [self.step_batches[(self.step, k)] for k in range(self.step_batches.micro_batches_per_step())]

    # ------------------------------------------------------------------ training
    def train_step(self, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One optimiser step over the global batch; returns its metrics.

        Args:
            items: This step's micro-batches from :meth:`data_loader` (default: built here).
        """
        recipe, model = self.recipe, self.model
        started = time.perf_counter()
        items = items if items is not None else self._step_items()
        if any(item["step"] != self.step for item in items):
            raise RuntimeError(f"the data loader is out of step with training (step {self.step})")
        read, skipped = self.skips.record(items)
        self.skips.check(*self.dist.sum_many([float(read), float(skipped)]))
        config = configuration_for_step(getattr(model, "plan", None), recipe.training.mode,
                                        recipe.training.configuration, recipe.training.seed, self.step)
        batches = [item["batch"] for item in items]
        for batch in batches:
            batch["labels"] = model.language_model.supervised_labels(batch["input_ids"], batch["labels"])
        tokens = self.dist.sum(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)))
        if tokens == 0:
            raise ValueError(f"step {self.step}: the global batch has no supervised tokens")
        set_train_mode(model)  # frozen parts (BatchNorm statistics) stay as they are
        loss_sum = 0.0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=recipe.training.bf16 and self.dist.device.type == "cuda")
        for index, batch in enumerate(batches):
            batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            if self.dist.world > 1:
                model.set_requires_gradient_sync(index == len(batches) - 1)
            with autocast:
                # logits_to_keep=-1: the LM head runs only on supervised positions (memory-light).
                mean = model(**batch, labels=labels, sa_layers=config, logits_to_keep=-1).loss
            summed = mean * int((labels[:, 1:] != -100).sum())
            # FSDP averages gradients over ranks; scaling by world/tokens makes the result the mean
            # over every supervised token of the global batch, as one process would compute it.
            (summed * self.dist.world / tokens).backward()
            loss_sum += float(summed.detach())
        # grad_clip null or 0: no clipping (an infinite norm scales by 1.0, exactly), the norm is still reported.
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   recipe.optim.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step trained with
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        return {"step": self.step, "loss": self.dist.sum(loss_sum) / tokens, "lr": lr,
                "grad_norm": float(grad_norm), "configuration": config, "tokens": int(tokens),
                "tokens_per_s": tokens / elapsed, "seconds": elapsed}

    def train(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (default: the recipe's), checkpointing on the way.

        The run folder is locked for the whole loop; batches come from :meth:`data_loader`.
        """
        total = max_steps if max_steps is not None else self.recipe.training.max_steps
        logs = []
        progress = None
        saved = self.step
        with self._locked(), stop_on_sigint(self.dist.main) as stop:
            # The metrics file holds each step once: lines beyond the step training starts from
            # (a killed run's, or an earlier run's in the same folder) are dropped, not duplicated.
            self._forget_metrics_after(self.step)
            if self.dist.main and self.recipe.logging.progress:
                from tqdm import tqdm

                progress = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
            try:
                per_step = self.step_batches.micro_batches_per_step()
                items: list[dict[str, Any]] = []
                for item in self.data_loader(self.step, total) if self.step < total else []:
                    items.append(item)
                    if len(items) < per_step:
                        continue
                    metrics = self.train_step(items)
                    items = []
                    logs.append(metrics)
                    self._log(metrics, progress)
                    stopping = bool(self.dist.sum(1.0 if stop else 0.0))  # every rank stops at the same step
                    if self.step % self.recipe.checkpoint.every_steps == 0 or self.step == total or stopping:
                        self.save_checkpoint()
                        saved = self.step
                    if stopping:
                        self.interrupted = True
                        break
            except KeyboardInterrupt as err:  # a second Ctrl-C, or one outside the main thread's handler
                if isinstance(err, TrainingInterrupted):
                    raise
                raise TrainingInterrupted(self._resume_hint(saved, lost=self.step - saved)) from None
            finally:
                if progress is not None:
                    progress.close()
        if self.interrupted:
            raise TrainingInterrupted(self._resume_hint(saved))
        return logs

    def _resume_hint(self, saved: int, lost: int = 0) -> str:
        """Where training stopped, what is saved, and the command that continues it."""
        where = f"checkpoint step {saved} in {self.ckpt_dir}" if saved else f"no checkpoint yet in {self.ckpt_dir}"
        lost_text = f" ({lost} step(s) since it were not saved)" if lost else ""
        how = f"visorlib train {self.recipe.source} --resume" if saved else f"visorlib train {self.recipe.source}"
        return f"interrupted at step {self.step}; {where}{lost_text}; continue with: {how}"

    def _log(self, metrics: dict[str, Any], progress) -> None:
        if not self.dist.main:
            return
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        path = self.recipe.logging.metrics_file
        if path and metrics["step"] % self.recipe.logging.every_steps == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def _forget_metrics_after(self, step: int) -> None:
        """Drop metrics lines of steps after ``step``: a resumed run logs them again (a half-written
        last line of a killed run goes too)."""
        path = self.recipe.logging.metrics_file
        if not (self.dist.main and path and Path(path).exists()):
            return
        lines = Path(path).read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) < len(lines):
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    # --------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def save_checkpoint(self) -> Path:
        """Write ``step_XXXXXXXX`` atomically (temporary folder, then rename) and point ``latest`` at it.

        The DCP shards (with their ``.metadata``), the ``model/`` export and, last, ``trainer.json``
        come from the same in-memory state, under the run-folder lock; only a folder with both
        ``trainer.json`` and ``.metadata`` counts as a checkpoint.
        """
        final = self.ckpt_dir / f"step_{self.step:08d}"
        tmp = self.ckpt_dir / f".tmp_step_{self.step:08d}"
        with self._locked():
            if self.dist.main:
                # Under the lock no other run is writing: leftovers are a dead save's, still holding disk.
                for stale in self.ckpt_dir.glob(".tmp_step_*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.dist.barrier()
            try:
                self._write_checkpoint(tmp, final)
            except (Exception, CheckpointException, KeyboardInterrupt) as err:
                if self.dist.main:
                    shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and `latest` are untouched
                if disk_full(err):
                    raise RunDirError(f"no space left on device while saving step {self.step} into checkpoint.dir "
                                      f"{self.ckpt_dir} (the partial save was removed; the latest complete checkpoint "
                                      "is kept): free space there or lower checkpoint.keep, then --resume") from None
                raise
            self.dist.barrier()
        return final

    def _write_checkpoint(self, tmp: Path, final: Path) -> None:
        """The body of :meth:`save_checkpoint`: fill ``tmp``, then rename it to ``final``."""
        with quiet_single_process():
            dcp.save(self._state(), checkpoint_id=str(tmp))
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.main:
            if self.recipe.checkpoint.export_safetensors:
                write_checkpoint(full, self.model.cfg, tmp / "model")
                save_tokenizer(self.processor, tmp / "model")
            atomic_write_json(tmp / "trainer.json", {"step": self.step, "scheduler": self.scheduler.state_dict(),
                                                     "source": self.recipe.source, "recipe": self.recipe.to_dict()})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (self.ckpt_dir / "latest.tmp").write_text(final.name)
            os.replace(self.ckpt_dir / "latest.tmp", self.ckpt_dir / "latest")
            self._prune()

    def _prune(self) -> None:
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.recipe.checkpoint.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def is_complete(folder: Path) -> bool:
        """Both the trainer state and the DCP metadata (written last by ``dcp.save``) are there."""
        return (folder / "trainer.json").is_file() and (folder / ".metadata").is_file()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder (half-written ``.tmp_*`` folders never count)."""
        pointer = self.ckpt_dir / "latest"
        if pointer.exists():
            candidate = self.ckpt_dir / pointer.read_text().strip()
            if self.is_complete(candidate):
                return candidate
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if self.is_complete(p))
        return done[-1] if done else None

    def resume(self, path: Path | None = None, allow_recipe_change: bool = False) -> int:
        """Load the latest (or given) checkpoint; returns the step training continues from.

        Raises:
            ConfigError: The recipe differs from the checkpoint's beyond the fields that may change,
                unless ``allow_recipe_change``.
        """
        path = path or self.latest_checkpoint()
        if path is None:
            with self._locked():
                self._forget_metrics_after(self.step)
            return self.step
        meta = json.loads((path / "trainer.json").read_text())
        # Every checkpoint records its recipe as a mapping; one that does not (a pre-0.1 run recorded
        # only the path) differs in every field, so resuming it needs --allow-recipe-change.
        saved = meta.get("recipe")
        now = json.loads(json.dumps(self.recipe.to_dict()))
        changes = recipe_differences(saved if isinstance(saved, dict) else {}, now)
        if changes and not allow_recipe_change:
            raise ConfigError(f"{self.recipe.source}: the recipe differs from the one {path} was trained with "
                              f"({'; '.join(changes)}); resume with the same recipe, or accept the change with "
                              "--allow-recipe-change (Trainer(..., allow_recipe_change=True))")
        for change in changes:
            log.warning("resuming with a changed recipe: %s", change)
        step, total = int(meta["step"]), self.recipe.training.max_steps
        if step > total:
            raise ConfigError(f"{self.recipe.source}: training.max_steps={total} but {path} is at step {step}: "
                              f"nothing to train (a resumed run cannot go back); set training.max_steps above {step}")
        state = self._state()
        try:
            # A run saved before the language model owned its parts names the optimizer's entries
            # decoder.* / cross_attention.* / router.*; read them under those names.
            flat = _saved_with_flat_names(path)
            if flat:
                state["optim"] = _optimizer_names(state["optim"], _flat_name)
            with quiet_single_process():
                dcp.load(state, checkpoint_id=str(path))
            if flat:
                state["optim"] = _optimizer_names(state["optim"], _nested_name)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except (CheckpointException, RuntimeError, KeyError, ValueError) as err:
            # DCP's CheckpointException is a BaseException (the CLI's handler would miss it) and lists
            # every rank's traceback; the cause that matters is that the shapes or names differ.
            raise CheckpointError(f"{path} does not fit the model built from {self.recipe.source} (the architecture "
                                  f"differs from the one it was trained with: {reason(err)}); resume with the recipe it "
                                  "was trained with, or start a new run in another checkpoint.dir") from None
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = step
        with self._locked():
            self._forget_metrics_after(self.step)
        return self.step

    def close(self) -> None:
        """Release the run folder and tear down the process group (torchrun runs)."""
        self.lock.release()
        if self.dist.world > 1 and dist.is_initialized():
            # Let every rank finish its last collectives first: tearing gloo down with work in
            # flight aborts the process ("terminate called without an active exception").
            if self.dist.device.type == "cuda":
                torch.cuda.synchronize(self.dist.device)
            dist.barrier()
            dist.destroy_process_group()
