"""Router pseudo-labels and router training (paper §4.3 and appendix D).

1. :func:`log_configurations` runs the universal model over a data subset under *every* viable
   configuration and logs, per sample and configuration, whether the answer is right (greedy
   decoding = teacher-forced argmax, token by token), how many leading answer tokens match, and the
   mean token loss.
2. :func:`select_labels` turns that log into one target configuration per sample:
   ``"dataset"`` (the paper): for each dataset keep the configurations reaching >= 99 % of the full
   model's accuracy, then take the one with the fewest SA layers, then the lowest loss;
   ``"sample"`` (the appendix D oracle): for each sample the configuration with the longest correct
   prefix, then the fewest SA layers, then the lowest loss.
3. :func:`train_router` fits the router with cross-entropy on those labels (only the router and its
   routing-token embedding learn; the layers below it are frozen), and reports accuracy on held-out
   samples and the FLOPs the routed configurations save against the full model.

:func:`run_router_stage` is the recipe's router stage. The task accuracy it reports before and
after (answers generated and scored the way ``visorlib eval`` scores them) is evaluation's work:
the caller passes it in as ``task_accuracy``
(:func:`visorlib.eval.held_out.held_out_task_accuracy`; the ``visorlib train`` command does), so
nothing in ``train/`` imports ``eval/``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.conversations import collate
from ..flops import flops
from ..models import set_train_mode


def full_configuration(plan) -> list[int]:
    """The reference ("full model") configuration: the costliest viable one."""
    return max(plan.configurations, key=plan.cost)


@torch.inference_mode()
def log_configurations(model, datasets, refs: Iterable[tuple[int, int]], pad_id: int, path: str | Path | None = None,
                       progress: bool = False):
    """Per-sample correctness, matched prefix and loss for every viable configuration.

    Args:
        model: A universal VISOR model.
        datasets: :class:`~visorlib.data.conversations.ConversationDataset` list.
        refs: ``(dataset, index)`` samples to evaluate.
        pad_id: Padding id for batching.
        path: Append the rows to this JSONL file too.
        progress: Show a progress bar (one tick per sample).

    Returns:
        Rows ``{"dataset", "index", "configuration", "correct", "matched", "answer_tokens", "loss",
        "n_visual", "n_text"}``.
    """
    model.eval()
    rows = []
    for d, i in tqdm(list(refs), desc="router labels", disable=not progress, dynamic_ncols=True):
        sample = datasets[d][i]
        batch = _to(collate([sample], pad_id), model)
        labels = model.language_model.supervised_labels(batch["input_ids"], batch.pop("labels"))[0, 1:]
        supervised = labels != -100
        n_visual = int(model.language_model.visual_token_mask(batch["input_ids"]).sum())
        for configuration in model.plan.configurations:
            logits = model(**batch, sa_layers=configuration).logits[0, :-1]
            hits = (logits.argmax(-1) == labels)[supervised]
            matched = int(hits.long().cumprod(0).sum())
            loss = F.cross_entropy(logits[supervised].float(), labels[supervised]).item()
            rows.append({"dataset": datasets[d].name, "index": i, "configuration": configuration,
                         "correct": bool(hits.all()), "matched": matched, "answer_tokens": int(supervised.sum()),
                         "loss": loss, "n_visual": n_visual, "n_text": batch["input_ids"].shape[1] - n_visual})
    if path is not None:
        with open(path, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return rows


def select_labels(rows: list[dict[str, Any]], plan, mode: str = "dataset") -> dict[tuple[str, int], list[int]]:
    """One target configuration per ``(dataset, index)`` from a :func:`log_configurations` log.

    Args:
        rows: The log.
        plan: The model's :class:`~visorlib.visor.plan.LayerPlan` (configurations and costs).
        mode: ``"dataset"`` (paper §4.3) or ``"sample"`` (appendix D oracle).
    """
    if mode not in ("dataset", "sample"):
        raise ValueError(f"label mode must be 'dataset' or 'sample', got {mode!r}")
    full = full_configuration(plan)
    by_sample: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        by_sample[(row["dataset"], row["index"])].append(row)
    if mode == "sample":
        labels = {}
        for key, options in by_sample.items():
            best = min(options, key=lambda r: (-r["matched"], len(r["configuration"]), r["loss"]))
            labels[key] = list(best["configuration"])
        return labels
    per_dataset: dict[str, dict[tuple[int, ...], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        per_dataset[row["dataset"]][tuple(row["configuration"])].append(row)
    chosen = {}
    for name, by_config in per_dataset.items():
        accuracy = {c: sum(r["correct"] for r in rs) / len(rs) for c, rs in by_config.items()}
        loss = {c: sum(r["loss"] for r in rs) / len(rs) for c, rs in by_config.items()}
        reference = accuracy.get(tuple(full), max(accuracy.values()))
        good = [c for c in by_config if accuracy[c] >= 0.99 * reference]
        chosen[name] = list(min(good, key=lambda c: (len(c), loss[c])))
    return {key: chosen[key[0]] for key in by_sample}


def split_labels(labels: dict[tuple[str, int], list[int]], eval_fraction: float, seed: int = 0):
    """``(held_out, training)`` lists of ``((dataset, index), label)``: a seeded shuffle, then a cut.

    At least one sample is held out when ``eval_fraction > 0`` and one is left to train on.
    """
    items = sorted(labels.items())
    random.Random(seed).shuffle(items)
    held = min(len(items) - 1, max(1, int(len(items) * eval_fraction))) if eval_fraction > 0 and len(items) > 1 else 0
    return items[:held], items[held:] or items


def train_router(model, datasets, labels: dict[tuple[str, int], list[int]], pad_id: int, steps: int = 200,
                 lr: float = 1e-3, batch_size: int = 8, eval_fraction: float = 0.2, seed: int = 0,
                 progress: bool = False, train_token: bool = False) -> dict[str, Any]:
    """Fit the router on pseudo-labels; returns held-out accuracy and FLOP savings.

    Only the router's MLP learns (``router.*`` except the routing token, unless ``train_token``). The
    routing pass stops after the router's layer, so a step costs a few decoder layers, not the
    whole model.
    """
    if model.router is None:
        raise ValueError(f"{model.cfg.name} has no router to train")
    index = {name: i for i, name in enumerate(d.name for d in datasets)}
    evaluation, training = split_labels(labels, eval_fraction, seed)
    router = {id(p) for p in model.language_model.parameters_for("router").values()}
    for param in model.parameters():
        # The routing token's embedding is an input every later layer reads: training it changes
        # the universal model's answers under every configuration (measured on synthdoc: pair
        # questions fell from 1.00 to 0.61-0.67). By default only the router's MLP learns.
        param.requires_grad_(id(param) in router and (train_token or param is not model.router.token))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    set_train_mode(model)  # frozen parts (BatchNorm statistics) stay as they are
    for _ in tqdm(range(steps), desc="router train", disable=not progress, dynamic_ncols=True):
        chosen = [training[rng.randrange(len(training))] for _ in range(batch_size)]
        logits, targets = _router_logits(model, datasets, index, chosen, pad_id)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1], **evaluate_router(model, datasets, index,
                                                                                             evaluation, pad_id)}


def _router_logits(model, datasets, index, chosen, pad_id):
    samples = [datasets[index[name]][i] for (name, i), _ in chosen]
    batch = _to(collate(samples, pad_id), model)
    batch.pop("labels")
    out = _route(model, batch)
    # One routing token per question: every question of a sample learns the sample's label.
    per_token = out["sample_of_token"]
    targets = torch.tensor([model.plan.configurations.index(chosen[s][1]) for s in per_token.tolist()],
                           device=out["logits"].device)
    return out["logits"], targets


def _to(batch: dict[str, Any], model) -> dict[str, Any]:
    """Move a collated batch to the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _route(model, batch) -> dict[str, Any]:
    """The routing phase (:meth:`~visorlib.models.base.VisionLanguageModel.route`): the router's
    logits, the sample of each routing token and the chosen configurations."""
    report = model.route(**batch)
    return {"logits": report.router_logits, "sample_of_token": report.routed_samples, "configs": report.executed}


@torch.no_grad()
def evaluate_router(model, datasets, index, items, pad_id) -> dict[str, Any]:
    """Accuracy of the router's (costliest-per-sample) choice, and FLOPs against the full model."""
    if not items:
        return {"eval_samples": 0}
    full = full_configuration(model.plan)
    hits, routed_flops, full_flops = 0, 0.0, 0.0
    for (name, i), label in items:
        sample = datasets[index[name]][i]
        batch = _to(collate([sample], pad_id), model)
        batch.pop("labels")
        chosen = _route(model, batch)["configs"][0]
        hits += chosen == label
        n_visual = int(model.language_model.visual_token_mask(batch["input_ids"]).sum())
        n_text = batch["input_ids"].shape[1] - n_visual
        routed_flops += flops(model, n_visual, n_text, sa_layers=chosen).language_model
        full_flops += flops(model, n_visual, n_text, sa_layers=full).language_model
    return {"eval_samples": len(items), "router_accuracy": hits / len(items),
            "flops_saving_vs_full": full_flops / routed_flops}


def run_router_stage(recipe, trainer, task_accuracy: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recipe's router stage: log every configuration, pick labels, train, export, report.

    Args:
        recipe: The loaded recipe (``training.stage: router``).
        trainer: Its :class:`~visorlib.train.trainer.Trainer` (model, datasets, processor).
        task_accuracy: ``(model, processor, datasets, held_out, configs, batch_size, max_skip_fraction)
            -> {dataset: {configuration: score}}``, e.g.
            :func:`visorlib.eval.held_out.held_out_task_accuracy`; None leaves the task-accuracy
            entries out of the report.
    """
    from .trainer import save_tokenizer

    if trainer.dist.world > 1:
        raise ValueError("the router stage runs in one process (the router is small): start it without torchrun")
    spec = recipe.router
    model, datasets = trainer.model, trainer.datasets
    pad = trainer.processor.tokenizer.pad_token_id or 0
    out_dir = Path(recipe.checkpoint.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.labels_file and Path(spec.labels_file).exists():
        rows = [json.loads(line) for line in Path(spec.labels_file).read_text().splitlines() if line.strip()]
    else:
        refs = [(d, i) for d, dataset in enumerate(datasets) for i in range(min(len(dataset), spec.samples_per_dataset))]
        log_path = Path(spec.labels_file or out_dir / "configuration-log.jsonl")
        log_path.unlink(missing_ok=True)
        rows = log_configurations(model, datasets, refs, pad, log_path, progress=recipe.logging.progress)
    labels = select_labels(rows, model.plan, spec.label_mode)
    # With router.train_token the routing-token embedding, which every later layer sees, learns too:
    # the fixed configurations' task accuracy is measured on the held-out split before and after,
    # next to the router's own, so the report shows both the router and the shift it caused.
    held_out, _ = split_labels(labels, spec.eval_fraction, recipe.training.seed)
    fixed = [list(c) for c in model.plan.configurations]
    skip = recipe.data.max_skip_fraction
    before = None if task_accuracy is None else task_accuracy(
        model, trainer.processor, datasets, held_out, fixed, recipe.data.micro_batch_size, skip)
    report = train_router(model, datasets, labels, pad, spec.steps, recipe.optim.lr, recipe.data.micro_batch_size,
                          spec.eval_fraction, recipe.training.seed, progress=recipe.logging.progress,
                          train_token=spec.train_token)
    if task_accuracy is not None:
        report["task_accuracy_before_router_training"] = before
        report["task_accuracy"] = task_accuracy(model, trainer.processor, datasets, held_out, [*fixed, "router"],
                                                recipe.data.micro_batch_size, skip)
    model.save_pretrained(out_dir / "model")
    save_tokenizer(trainer.processor, out_dir / "model")
    (out_dir / "router-report.json").write_text(json.dumps(report, indent=2))
    return report
