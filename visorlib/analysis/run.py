"""``analyze``: the three measurements of a model on evaluation data, as one JSON-ready report.

Samples come from the evaluation data layer (:func:`~visorlib.eval.datasets.load_data`: a local
LLaVA-style file or a benchmark task) and are grouped by dataset, and by ``dataset/category`` when
rows carry a category. For each batch of samples:

1. the question and its first reference answer are encoded as one training turn (the
   processor's ``encode_turns``, so the answer is teacher-forced exactly as training sees it) and
   right-padded with the training collate; one observed forward gives the attention shares of
   every layer (:mod:`.attention`) and the visual tokens' hidden states at every layer boundary,
   from which each sample's CKA matrix is computed at once (:mod:`.cka`) and the states dropped;
2. the question alone is encoded as the evaluation encodes it and answered greedily under the
   empty subset and each random layer-drop subset (:mod:`.layer_drop`).

Per-group results are means over the group's samples. Numbers that do not exist (no answer
token, a constant representation) are NaN in tensors and ``null`` in the JSON.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from .attention import KEY_GROUPS, SOURCES, answer_positions, measure_batch
from .cka import cka_matrix
from .layer_drop import correlation, droppable_layers, easy_hard, layer_drop_scores, random_subsets
from .suggest import suggest_plan

log = logging.getLogger("visorlib.analysis")


def group_name(sample) -> str:
    """``dataset``, or ``dataset/category`` when the row has a category other than the dataset's name."""
    category = sample.category
    return f"{sample.dataset}/{category}" if category and category != sample.dataset else sample.dataset


def load_samples(data: Sequence[Any], limit: int | None = None, metric: str = "exact_match",
                 image_root: str | None = None) -> list:
    """The first ``limit`` samples of each ``--data`` spec (broken rows are skipped with a warning).

    Raises:
        ValueError: A spec that names no file or task, or data without a single usable sample.
    """
    from ..eval.datasets import EvalDataset, load_data

    samples = []
    for spec in data:
        dataset = spec if isinstance(spec, EvalDataset) else load_data(str(spec), metric, image_root)
        for index, message in dataset.problems:
            log.warning("skipping a broken sample (%s row %d): %s", dataset.source, index, message)
        samples += dataset.samples[:limit] if limit else dataset.samples
    if not samples:
        raise ValueError(f"--data {', '.join(str(d) for d in data)}: no usable sample")
    return samples


def teacher_forced(processor, sample) -> dict[str, Any]:
    """Question + first reference answer as one training turn (``input_ids``, ``labels``, pixels).

    Raises:
        ValueError: The sample cannot be encoded (named by file and row).
    """
    if not sample.answers:
        raise ValueError(f"{sample.source}[{sample.index}]: no reference answer to teacher-force")
    try:
        return processor.encode_turns([("user", sample.question), ("assistant", sample.answers[0])], sample.images())
    except (ValueError, OSError) as err:
        raise ValueError(f"{sample.source}[{sample.index}]: {err}") from err


def _nan_mean(rows: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(rows)
    return stacked.nansum(0) / (~stacked.isnan()).sum(0)  # 0/0 -> NaN where no sample has a value


def analyze(model, processor, samples: Sequence, *, sa_layers: object = None, batch_size: int = 4,
            chunk: int = 64, cka_estimator: str = "paper", drop_subsets: int = 8, seed: int = 0,
            max_new_tokens: int = 16, suggest: bool = False, progress: bool = True) -> dict[str, Any]:
    """Attention shares, CKA and layer-drop sensitivity of ``model`` on ``samples``.

    Args:
        model: A visorlib model (dense or VISOR, any family), in eval mode.
        processor: Its processor (with a tokenizer).
        samples: :class:`~visorlib.eval.datasets.EvalSample` s (:func:`load_samples`).
        sa_layers: The configuration measured (VISOR; None: the card's default).
        batch_size: Samples per forward / generation batch.
        chunk: Queries per attention block (memory ``heads x chunk x tokens``).
        cka_estimator: ``"paper"`` or ``"unbiased"`` (:mod:`.cka`).
        drop_subsets: Random layer-drop subsets besides the empty one (0: no layer drop).
        seed: Seed of the subsets.
        max_new_tokens: Longest generated answer in the layer-drop runs.
        suggest: Add a suggested ``visor:`` plan (:mod:`.suggest`).
        progress: Progress bars on stderr.

    Returns:
        The report (plain lists and numbers, NaN kept as float NaN; see :func:`to_json`).
    """
    from tqdm import tqdm

    from ..data.conversations import collate

    if processor.tokenizer is None:
        raise ValueError("analysis needs the model's tokenizer (tokenizer.json beside the checkpoint)")
    executed = droppable_layers(model, sa_layers)  # a bad configuration fails before any sample runs
    device = next(model.parameters()).device
    pad = processor.tokenizer.pad_token_id
    pad = model.cfg.tokens.pad_token_id if pad is None else pad
    names = [group_name(s) for s in samples]
    shares, updates, ckas = defaultdict(list), defaultdict(list), defaultdict(list)
    visual = defaultdict(list)
    bar = tqdm(total=len(samples), desc="attention + CKA", unit="sample", disable=not progress)
    for start in range(0, len(samples), batch_size):
        part = range(start, min(start + batch_size, len(samples)))
        batch = collate([teacher_forced(processor, samples[i]) for i in part], pad)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        probe = measure_batch(model, batch, answer_positions(batch["labels"]), sa_layers, chunk, keep_states=True)
        for row, i in enumerate(part):
            shares[names[i]].append(probe.shares[row])
            updates[names[i]].append(probe.ca_update[row])
            valid = probe.visual_valid[row]
            visual[names[i]].append(int(valid.sum()))
            if int(valid.sum()) >= 4:
                ckas[names[i]].append(cka_matrix(torch.stack([s[row][valid] for s in probe.states]), cka_estimator))
        bar.update(len(part))
    bar.close()

    groups = list(dict.fromkeys(names))
    report: dict[str, Any] = {
        "model": model.cfg.name,
        "family": model.cfg.family,
        "dense": model.plan.dense,
        "num_layers": model.plan.num_layers,
        "ca_layers": list(model.plan.ca_layers),
        "executed_sa_layers": executed,
        "settings": {"batch_size": batch_size, "chunk": chunk, "cka_estimator": cka_estimator,
                     "drop_subsets": drop_subsets, "seed": seed, "max_new_tokens": max_new_tokens,
                     "device": str(device), "dtype": str(model.dtype).removeprefix("torch.")},
        "groups": {g: {"samples": names.count(g), "visual_tokens_mean": sum(visual[g]) / len(visual[g])}
                   for g in groups},
        "attention": {},
        "cka": {"estimator": cka_estimator,
                "states": "index i = the visual tokens entering layer i; the last = leaving the last layer",
                "matrices": {}},
    }
    for g in groups:
        mean = _nan_mean(shares[g])  # [layers, 2, 4]
        update = _nan_mean(updates[g])
        report["attention"][g] = {
            "query_to_image": mean[:, 0, 0].tolist(),
            "answer_to_image": mean[:, 1, 0].tolist(),
            "answer_to_query": mean[:, 1, 1].tolist(),
            "shares": {src: {key: mean[:, s, k].tolist() for k, key in enumerate(KEY_GROUPS)}
                       for s, src in enumerate(SOURCES)},
            "ca_update_ratio": {src: update[:, s].tolist() for s, src in enumerate(SOURCES)},
        }
        if ckas[g]:
            report["cka"]["matrices"][g] = _nan_mean(ckas[g]).tolist()

    if drop_subsets:
        report["layer_drop"] = _layer_drop(model, processor, samples, names, groups, sa_layers, drop_subsets, seed,
                                           batch_size, max_new_tokens, progress)
    if suggest:
        report["suggested_plan"] = _suggestion(report)
    return report


def _layer_drop(model, processor, samples, names, groups, sa_layers, count, seed, batch_size, max_new_tokens,
                progress) -> dict[str, Any]:
    from ..eval.runner import encode_prompt

    layers = droppable_layers(model, sa_layers)
    if not layers:
        return {"subsets": [], "note": "no layer can drop vision (the configuration executes no SA layer)"}
    subsets = random_subsets(layers, count, seed)
    encoded = []
    for s in samples:
        try:
            encoded.append(encode_prompt(processor, s.question, s.images()))
        except (ValueError, OSError) as err:
            raise ValueError(f"{s.source}[{s.index}]: {err}") from err
    scores = layer_drop_scores(model, processor, encoded, samples, subsets, batch_size, max_new_tokens, sa_layers,
                               progress)
    accuracy = {g: [sum(sc for sc, n in zip(per, names, strict=True) if n == g) / names.count(g) for per in scores]
                for g in groups}
    corr = correlation(accuracy)
    return {"droppable_layers": layers, "subsets": subsets, "accuracy": accuracy, "groups": groups,
            "correlation": corr, "cluster": easy_hard(accuracy)}


def _suggestion(report: dict[str, Any]) -> dict[str, Any]:
    """The plan from the mean answer→image curve and the lowest-CKA group's matrix."""
    groups = list(report["attention"])
    layers = report["num_layers"]
    curve = [_mean([report["attention"][g]["answer_to_image"][i] for g in groups]) for i in range(layers)]
    matrices = report["cka"]["matrices"]
    if not matrices:
        raise ValueError("--suggest-plan needs CKA matrices (samples with at least 4 visual tokens)")
    decider = min(matrices, key=lambda g: _mean([v for row in matrices[g] for v in row]))
    section = suggest_plan(curve, matrices[decider], layers)
    return {"visor": section, "answer_to_image_mean": curve, "cka_group": decider,
            "note": "heuristic: CA at answer->image peaks, SA candidates at CKA stage boundaries "
                    "(docs/analysis.md)"}


def _mean(values: Sequence[float]) -> float:
    real = [v for v in values if v is not None and not math.isnan(v)]
    return sum(real) / len(real) if real else float("nan")


def to_json(value: Any) -> Any:
    """``value`` with NaN / infinity replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value
