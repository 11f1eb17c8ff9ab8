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
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)

from .. import zoo
from ..hub import atomic_write_json, write_checkpoint
from ..models import family_of
from .data import BatchPlan, ConversationDataset, collate
from .recipe import Recipe


@contextmanager
def _quiet_single_process():
    """DCP warns that it runs without a process group; that is the intended single-process mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Distributed:
    """Rank, world size and device, from the ``torchrun`` environment (a single process otherwise)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor)


def configuration_for_step(plan, mode: str, fixed: list[int] | None, seed: int, step: int) -> list[int] | None:
    """The configuration of an optimiser step: a pure function of (seed, step), so all ranks agree."""
    if mode == "dense" or plan is None or plan.dense:
        return None
    if mode == "independent":
        return list(fixed)
    return list(random.Random(f"{seed}-configuration-{step}").choice(plan.configurations))


def trainable_names(model, stage, freeze_vision_tower: bool = False) -> set[str]:
    """Names of the parameters a training stage updates."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if stage == "router":
        return {n for n in names if n.startswith("router.")}
    if stage == 1:
        packing = getattr(model, "packer", None) is not None
        return {n for n in names if n.startswith("cross_attention.") or (packing and n.startswith("projector.linear_1"))}
    names = {n for n in names if not n.startswith("router.")}
    if freeze_vision_tower:
        names = {n for n in names if not n.startswith("vision_tower.")}
    return names


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
    cfg = zoo.get_config(spec.name)
    if spec.tiny:
        cfg = cfg.tiny()
    if spec.overrides:
        cfg = cfg.with_overrides(spec.overrides, f"{recipe.source}: model.overrides")
    if spec.pretrained:
        if spec.pretrained is not True and (Path(spec.pretrained) / "visorlib.json").exists():
            # A visorlib checkpoint carries its own architecture; a dense one becomes the card's VISOR model.
            model = zoo.from_pretrained(spec.pretrained, device=device)
            if model.cfg.visor is None and cfg.visor is not None:
                from ..models.visor import visorize

                model = visorize(model, cfg.visor)
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


class Trainer:
    """Runs a :class:`Recipe`.

    Args:
        recipe: The parsed recipe.
        resume: Continue from the latest complete checkpoint in ``checkpoint.dir`` if there is one.
    """

    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe, self.dist = recipe, Distributed()
        train = recipe.training
        self.model = build_model(recipe, self.dist.device)
        trainable = trainable_names(self.model, train.stage, train.freeze_vision_tower)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trainable)
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
        self.processor = training_processor(self.model, recipe)
        self.datasets = [ConversationDataset(spec, self.processor, recipe.data.max_length, recipe.data.on_error)
                         for spec in recipe.data.datasets]
        if not self.datasets:
            raise ValueError(f"{recipe.source}: data.datasets is empty")
        self.plan = BatchPlan(self.datasets, [d.weight for d in recipe.data.datasets], train.global_batch_size,
                              train.seed, recipe.data.group_by_length)
        if train.global_batch_size % (self.dist.world * recipe.data.micro_batch_size):
            raise ValueError(f"{recipe.source}: global_batch_size {train.global_batch_size} is not divisible by "
                             f"world size {self.dist.world} x micro_batch_size {recipe.data.micro_batch_size}")
        self.step = 0
        self.ckpt_dir = Path(recipe.checkpoint.dir)
        if resume:
            self.resume()

    def _shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for module in [*self.model.decoder.layers, *(self.model.cross_attention or {}).values(), self.model.vision_tower]:
            fully_shard(module)
        fully_shard(self.model)

    # ------------------------------------------------------------------ training
    def train_step(self) -> dict[str, Any]:
        """One optimiser step over the global batch; returns its metrics."""
        recipe, model = self.recipe, self.model
        started = time.perf_counter()
        refs = self.plan.global_batch(self.step)
        per_rank = len(refs) // self.dist.world
        mine = refs[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        micro = recipe.data.micro_batch_size
        config = configuration_for_step(getattr(model, "plan", None), recipe.training.mode,
                                        recipe.training.configuration, recipe.training.seed, self.step)
        pad = self.processor.tokenizer.pad_token_id if self.processor.tokenizer.pad_token_id is not None else 0
        batches = [collate([self.datasets[d][i] for d, i in mine[k:k + micro]], pad) for k in range(0, len(mine), micro)]
        for batch in batches:
            batch["labels"] = model.supervised_labels(batch["input_ids"], batch["labels"])
        tokens = self.dist.sum(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)))
        if tokens == 0:
            raise ValueError(f"step {self.step}: the global batch has no supervised tokens")
        model.train()
        loss_sum = 0.0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=recipe.training.bf16 and self.dist.device.type == "cuda")
        for index, batch in enumerate(batches):
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
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
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   recipe.optim.grad_clip)
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
        """Train until ``max_steps`` (default: the recipe's), checkpointing on the way."""
        total = max_steps if max_steps is not None else self.recipe.training.max_steps
        logs = []
        progress = None
        if self.dist.main and self.recipe.logging.progress:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
        while self.step < total:
            metrics = self.train_step()
            logs.append(metrics)
            self._log(metrics, progress)
            if self.step % self.recipe.checkpoint.every_steps == 0 or self.step == total:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        return logs

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

    # --------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def save_checkpoint(self) -> Path:
        """Write ``step_XXXXXXXX`` atomically (temporary folder, then rename) and point ``latest`` at it."""
        final = self.ckpt_dir / f"step_{self.step:08d}"
        tmp = self.ckpt_dir / f".tmp_step_{self.step:08d}"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        with _quiet_single_process():
            dcp.save(self._state(), checkpoint_id=str(tmp))
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.main:
            atomic_write_json(tmp / "trainer.json", {"step": self.step, "scheduler": self.scheduler.state_dict(),
                                                     "recipe": self.recipe.source})
            if self.recipe.checkpoint.export_safetensors:
                write_checkpoint(full, self.model.cfg, tmp / "model")
                save_tokenizer(self.processor, tmp / "model")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (self.ckpt_dir / "latest.tmp").write_text(final.name)
            os.replace(self.ckpt_dir / "latest.tmp", self.ckpt_dir / "latest")
            self._prune()
        self.dist.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.recipe.checkpoint.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder (half-written ``.tmp_*`` folders never count)."""
        pointer = self.ckpt_dir / "latest"
        if pointer.exists():
            candidate = self.ckpt_dir / pointer.read_text().strip()
            if (candidate / "trainer.json").exists():
                return candidate
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if (p / "trainer.json").exists())
        return done[-1] if done else None

    def resume(self, path: Path | None = None) -> int:
        """Load the latest (or given) checkpoint; returns the step training continues from."""
        path = path or self.latest_checkpoint()
        if path is None:
            return self.step
        state = self._state()
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = json.loads((path / "trainer.json").read_text())
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = int(meta["step"])
        return self.step

    def close(self) -> None:
        """Tear down the process group (torchrun runs)."""
        if self.dist.world > 1 and dist.is_initialized():
            # Let every rank finish its last collectives first: tearing gloo down with work in
            # flight aborts the process ("terminate called without an active exception").
            if self.dist.device.type == "cuda":
                torch.cuda.synchronize(self.dist.device)
            dist.barrier()
            dist.destroy_process_group()
