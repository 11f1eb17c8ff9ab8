"""The evaluation loop: every sample under every requested configuration, scored and costed.

For each batch the prompts are encoded exactly as training encodes a user turn (the family's chat
template, the routing marker when the model has a router) followed by the generation prompt, left
padded, and generated greedily. Each (sample, configuration) pair becomes one predictions line:
the answer, its score, the configuration that actually ran (the router's choice for ``router``),
the sample's token counts, its analytic language-model FLOPs (prefill + every decode step of the
answer it generated) and KV-cache bytes, and its share of the measured batch time. Lines are
appended as batches finish, so a killed run started again with the same predictions file only
generates what is missing, and the final table is the same.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.conversations import DataError, collate
from ..flops import decode_step_flops, flops, kv_bytes_per_token
from ..processing.chat import IM_START
from ..utils import synchronize
from .cache import (
    PredictionsLock,
    check_outputs,
    checkpoint_fingerprint,
    line_fingerprint,
    read_predictions,
    sample_digest,
)
from .configs import (  # noqa: F401  (re-exported: runner.parse_configs is where callers look)
    CONFIG_GRAMMAR,
    ROUTER,
    Configuration,
    parse_configs,
    reduction_label,
    with_reductions,
)
from .datasets import EvalDataset, EvalSample, load_data
from .metrics import score
from .report import EvalReport

log = logging.getLogger("visorlib.eval")


# -- encoding and generation (shared with the lmms-eval plugin) --------------------------------------


def encode_prompt(processor, question: str, images: Sequence[Any], token_reduction: Any = None,
                  videos: Sequence[Any] = ()) -> dict[str, Any]:
    """One user turn (LLaVA data style, ``<image>`` / ``<video>`` placeholders) + the generation prompt, unpadded.

    ``token_reduction``: the spec the model will run (None: the card's), for the placeholder counts.
    """
    sample = processor.encode_turns([("user", question)], images, videos, token_reduction=token_reduction)
    sample.pop("labels")
    head = torch.tensor(processor.tokenizer.encode(f"{IM_START}assistant\n"), dtype=torch.long)
    sample["input_ids"] = torch.cat([sample["input_ids"], head])
    return sample


def left_padded_batch(encoded: list[dict[str, Any]], pad_id: int, device) -> dict[str, Any]:
    """Collate like training (:func:`~visorlib.data.conversations.collate`), then move padding to the left."""
    batch = collate([dict(s, labels=s["input_ids"]) for s in encoded], pad_id)
    batch.pop("labels")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row in range(ids.shape[0]):
        shift = int(ids.shape[1] - mask[row].sum())
        ids[row], mask[row] = ids[row].roll(shift), mask[row].roll(shift)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Generated:
    """What one row of a generated batch produced."""

    text: str
    tokens: int  # generated tokens, the end-of-sequence token included
    sa_layers: list[int] | None  # the configuration that ran (None for a dense model)
    n_visual: int
    n_text: int
    seconds: float  # the batch's generate() time divided by its size


@torch.inference_mode()
def generate_batch(model, processor, encoded: list[dict[str, Any]], sa_layers: Any, max_new_tokens: int,
                   stop: Sequence[str] = (), token_reduction: Any = None,
                   sampling: dict[str, Any] | None = None) -> list[Generated]:
    """Answers for a batch of :func:`encode_prompt` outputs (greedy unless ``sampling`` says otherwise).

    Args:
        model: A visorlib model.
        processor: Its processor (tokenizer included).
        encoded: Unpadded prompts.
        sa_layers: One configuration for all, one list per sample, ``"router"`` or ``"all"``.
        max_new_tokens: Longest answer.
        stop: Strings that end an answer (the text is cut before the first one).
        token_reduction: The spec to run (None: the card's); ``encoded`` must be counted under it.
        sampling: :meth:`~visorlib.generation.GenerationMixin.generate` options (``do_sample``,
            ``temperature``, ``top_p``, ``top_k``, ``generator``); None decodes greedily.
    """
    pad = processor.tokenizer.pad_token_id
    batch = left_padded_batch(encoded, model.cfg.tokens.pad_token_id if pad is None else pad,
                              next(model.parameters()).device)
    if sa_layers == ROUTER:
        # generate() routes internally but does not return the choice: a forward pass over the
        # same prompt reports it (ModelOutput.sa_layers); routing is deterministic, so it is the
        # configuration generate() runs. That extra pass is not part of the measured time.
        ran = model(**batch, sa_layers=ROUTER, logits_to_keep=1, token_reduction=token_reduction).sa_layers
    elif model.plan.dense:
        ran = [None] * len(encoded)
    else:
        ran = [list(c) for c in model.language_model.request(sa_layers, len(encoded)).configurations]
    device = batch["input_ids"].device
    synchronize(device)
    started = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=max_new_tokens, sa_layers=sa_layers, token_reduction=token_reduction,
                         **(sampling or {}))
    synchronize(device)
    seconds = (time.perf_counter() - started) / len(encoded)
    length = batch["input_ids"].shape[1]
    eos = set(model.cfg.tokens.eos_token_ids)
    visual = model.language_model.visual_token_mask(batch["input_ids"]) & batch["attention_mask"].bool()
    results = []
    for row in range(len(encoded)):
        new = out[row, length:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        text = processor.decode(new[:end]).strip()
        for marker in stop:
            if marker and marker in text:
                text = text[: text.index(marker)].strip()
        n_visual = int(visual[row].sum())
        n_text = int(batch["attention_mask"][row].sum()) - n_visual
        results.append(Generated(text, end, None if ran[row] is None else list(ran[row]), n_visual, n_text, seconds))
    return results


def sample_cost(cfg, n_visual: int, n_text: int, sa_layers: Any, generated: int,
                token_reduction: Any = None) -> dict[str, float]:
    """Language-model FLOPs and KV bytes of answering one sample with ``generated`` tokens.

    The prefill (its logits for the last position give the first token) plus one decode step for
    each later token, each attending over everything before it. :mod:`visorlib.flops` has no
    whole-generation function, so this sums its per-step :func:`~visorlib.flops.decode_step_flops`.
    KV bytes (bf16) are those after the prefill plus one entry per layer for each decoded token.

    ``n_visual`` is what the prompt holds, so a pre-LLM reduction is already in it; the in-LLM
    methods of ``token_reduction`` (None: the card's) shrink the layers from their pruning layer
    on, in the prefill and in every decode step's cache.
    """
    from ..visor.reduction import IN_LLM, parse_reduction

    config = "all" if sa_layers is None else sa_layers
    spec = cfg.token_reduction if token_reduction is None else token_reduction
    in_llm = [r for r in parse_reduction(spec) if r.where == IN_LLM]
    prefill = flops(cfg, n_visual=n_visual, n_text=n_text, sa_layers=config, token_reduction=in_llm)
    decode = sum(decode_step_flops(cfg, n_visual, n_text + step, config, prefill.visual_per_layer)
                 for step in range(generated - 1))
    grown = max(generated - 1, 0) * cfg.decoder.num_layers * kv_bytes_per_token(cfg.decoder)
    return {"prefill_flops": prefill.language_model, "flops": prefill.language_model + decode,
            "kv_bytes": prefill.kv_cache_bytes + grown}


# -- the run -----------------------------------------------------------------------------------------


def _load_model(model_or_path, device, dtype):
    if not isinstance(model_or_path, (str, Path)):
        return model_or_path.eval()
    from .. import zoo

    name = str(model_or_path)
    if name in zoo.list_models():
        return zoo.build(name, pretrained=True, device=device, dtype=dtype)
    return zoo.from_pretrained(name, device=device, dtype=dtype)


def _processor(model, tokenizer):
    import warnings

    from ..zoo import processor_for

    if tokenizer is not None:
        return processor_for(model, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "images only" fallback warning becomes the error below
        processor = processor_for(model)
    if processor.tokenizer is None:
        folder = getattr(model, "checkpoint_dir", None)
        raise ValueError(f"{model.cfg.name}: no tokenizer found (no tokenizer.json in {folder or 'the checkpoint'}, "
                         "none in the Hub cache for the card's hub_id); pass --tokenizer (a folder, tokenizer.json "
                         "or Hub id)")
    return processor


class EvalIncomplete(DataError):
    """Nothing was evaluated, or more samples were skipped than allowed; ``report`` holds what was (or None)."""

    def __init__(self, message: str, report: EvalReport | None = None):
        super().__init__(message)
        self.report = report


def _check_skips(skipped: list[dict], evaluated: int, max_skip_fraction: float, report=None) -> None:
    """Raise :class:`EvalIncomplete` when nothing was evaluated or the skipped share passes the ceiling."""
    first = f"; first: {skipped[0]['error']}" if skipped else ""
    if not evaluated:
        raise EvalIncomplete(f"nothing was evaluated ({len(skipped)} sample(s) skipped{first})", report)
    total = evaluated + len(skipped)
    if len(skipped) > max_skip_fraction * total:
        raise EvalIncomplete(f"{len(skipped)} of {total} samples were skipped ({len(skipped) / total:.0%}, more than "
                             f"--max-skip-fraction={max_skip_fraction}){first}", report)


def _datasets(data, metric: str, image_root: str | None, allow_outside: bool) -> list[EvalDataset]:
    items = data if isinstance(data, (list, tuple)) else [data]
    return [d if isinstance(d, EvalDataset) else load_data(str(d), metric, image_root, allow_outside) for d in items]


def _apply_policy(datasets: list[EvalDataset], on_error: str, skipped: list[dict]) -> None:
    for dataset in datasets:
        for index, message in dataset.problems:
            if on_error == "fail":
                raise DataError(message)
            log.warning("skipping a broken sample: %s", message)
            skipped.append({"dataset": dataset.name, "file": dataset.source, "index": index, "error": message})


def evaluate(
    model_or_path,
    data,
    configs: str | Sequence[Any] | None = "default",
    limit: int | None = None,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    predictions: str | Path | None = None,
    max_new_tokens: int = 32,
    on_error: str = "skip",
    mix_configs: bool = False,
    metric: str = "exact_match",
    image_root: str | None = None,
    processor=None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    token_reductions: Sequence[Any] = (),
    tokenizer: str | Path | None = None,
    max_skip_fraction: float = 0.1,
    allow_outside_image_root: bool = False,
) -> EvalReport:
    """Evaluate a model on datasets under several configurations.

    Args:
        model_or_path: A built model, a zoo name (its Hub weights) or a checkpoint folder / Hub id.
        data: One or several ``--data`` specs (``file.jsonl``, ``docvqa_val``, ``docvqa_val=folder``)
            or :class:`~visorlib.eval.datasets.EvalDataset` s.
        configs: See :func:`parse_configs`.
        limit: Evaluate the first ``limit`` samples of each dataset.
        batch_size: Prompts generated together (left padded).
        out_dir: Write ``predictions.jsonl`` and ``report.json`` here (unless ``predictions`` is given).
        predictions: The predictions JSONL, a cache (:mod:`visorlib.eval.cache`): a line whose
            fingerprint (checkpoint, dtype, configuration, sample, ...) matches is reused, any other
            is generated again; the file is locked for the run.
        max_new_tokens: Longest answer.
        on_error: ``"skip"`` a broken row (listed in the report) or ``"fail"`` on it.
        mix_configs: Put different configurations into one batch (one ``sa_layers`` list per
            sample) instead of one configuration per batch. Faster; per-configuration times are
            then shares of mixed batches.
        metric: Metric of local rows that do not name one.
        image_root: Folder local image paths are relative to.
        processor: The model's processor (default: :func:`visorlib.processor_for`).
        device: Device of a model loaded here.
        dtype: Parameter dtype of a model loaded here.
        progress: Show a progress bar (samples/s) on stderr.
        token_reductions: Token-reduction specs (``docs/token-reduction.md``): every configuration
            is evaluated again under each (columns ``"1,4 + visionzip"``), FLOPs and KV bytes counted
            under it.
        tokenizer: Where the tokenizer is (a folder, ``tokenizer.json`` or Hub id) when the
            checkpoint has none beside it.
        max_skip_fraction: Largest accepted share of skipped (broken) samples.
        allow_outside_image_root: Accept image paths that leave the image root.

    Raises:
        EvalIncomplete: Nothing was evaluated, or more than ``max_skip_fraction`` of the samples
            were skipped (its ``report`` holds what was evaluated; predictions are kept).
        DataError: A bad data file or predictions file, or an output that would overwrite an input.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= max_skip_fraction <= 1:
        raise ValueError(f"--max-skip-fraction must be between 0 and 1, got {max_skip_fraction}")
    datasets = _datasets(data, metric, image_root, allow_outside_image_root)  # before the (slower) model load
    names = [d.name for d in datasets]
    if len(set(names)) < len(names):
        raise ValueError(f"several datasets are named {sorted({n for n in names if names.count(n) > 1})}: samples "
                         "are keyed by dataset name; rename a file or pass EvalDatasets with distinct names")
    if out_dir is not None:
        predictions = predictions or Path(out_dir) / "predictions.jsonl"
    path = Path(predictions) if predictions else None
    check_outputs([("--predictions", path, "predictions"),
                   ("report.json", out_dir and Path(out_dir) / "report.json", "report")], datasets)
    skipped: list[dict] = []
    _apply_policy(datasets, on_error, skipped)
    samples = [s for d in datasets for s in (d.samples[:limit] if limit else d.samples)]
    _check_skips(skipped, len(samples), max_skip_fraction)  # a wrong --image-root fails before the model loads
    model = _load_model(model_or_path, device, dtype)
    from_folder = isinstance(model_or_path, (str, Path))  # loaded here, unchanged: its files identify it
    processor = processor or _processor(model, tokenizer)
    columns = with_reductions(parse_configs(model, configs), token_reductions)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock = PredictionsLock(path) if path else None
    if lock:
        lock.acquire()  # before reading: a second run appending at once would interleave lines
    try:
        return _run(model, processor, samples, columns, skipped, path, from_folder, batch_size,
                    max_new_tokens, on_error, mix_configs, progress, max_skip_fraction, out_dir)
    finally:
        if lock:
            lock.release()


def _run(model, processor, samples, columns, skipped, path, from_folder, batch_size, max_new_tokens,
         on_error, mix_configs, progress, max_skip_fraction, out_dir) -> EvalReport:
    """Reuse what the predictions file holds, generate the rest, and build the report."""
    run = {"model": model.cfg.name, "max_new_tokens": max_new_tokens}
    expected: dict[tuple[str, str], str] = {}
    if path:
        run = {**run, "checkpoint": checkpoint_fingerprint(model, from_folder),
               "dtype": str(next(model.parameters()).dtype), "card": repr(model.cfg)}
        digests = {s.key: sample_digest(s) for s in samples}
        expected = {(s.key, c.label): line_fingerprint(run, c, digests[s.key]) for s in samples for c in columns}
    cached = {r["fingerprint"]: r for r in (read_predictions(path) if path else []) if r.get("fingerprint")}
    wanted = set(expected.values())
    records = [cached[fp] for fp in expected.values() if fp in cached]
    done = {(r["sample"], r["configuration"]) for r in records}
    broken = {r["sample"] for r in skipped if "sample" in r}
    todo = [(s, c) for s in samples for c in columns if (s.key, c.label) not in done]
    summary = {"file": str(path) if path else None, "reused": len(records), "total": len(expected),
               "stale": sum(1 for fp, r in cached.items() if (r["sample"], r["configuration"]) in expected
                            and fp not in wanted)}
    bar = _progress(len(todo), progress)
    handle = open(path, "a") if path else None
    context = (model.cfg.decoder.max_position_embeddings, max_new_tokens)
    try:
        for group in _chunks(_by_sample(todo), batch_size):
            encoded = {}  # (sample, spec) -> prompt: a pre-LLM spec changes the placeholder counts
            for (key, reduction), (sample, config) in {(s.key, c.reduction_key): (s, c) for s, c in group}.items():
                if key in broken:
                    continue
                prepared = _prepare(processor, sample, on_error, skipped, config.token_reduction, context)
                if prepared is not None:
                    encoded[key, reduction] = prepared
                else:
                    broken.add(key)
            bar.update(sum((s.key, c.reduction_key) not in encoded for s, c in group))
            group = [(s, c) for s, c in group if (s.key, c.reduction_key) in encoded]
            for batch in _batches(group, batch_size, mix_configs):
                new = _run_batch(model, processor, batch, encoded, max_new_tokens, run, expected)
                records += new
                if handle:
                    handle.write("".join(json.dumps(r) + "\n" for r in new))
                    handle.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if handle:
            handle.close()
    summary["generated"] = len(records) - summary["reused"]
    records = [r for r in records if r["sample"] not in broken]
    report = EvalReport.from_records(records, model.cfg.name, [c.label for c in columns], skipped)
    report.predictions = summary
    if out_dir is not None:
        report.save_json(Path(out_dir) / "report.json")
    _check_skips(skipped, len({r["sample"] for r in records}), max_skip_fraction, report)
    return report


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="eval", disable=not enabled, smoothing=0.1)


def _by_sample(todo: list[tuple[EvalSample, Configuration]]) -> list[list[tuple[EvalSample, Configuration]]]:
    groups: dict[str, list] = {}
    for sample, config in todo:
        groups.setdefault(sample.key, []).append((sample, config))
    return list(groups.values())


def _chunks(groups: list[list], samples_per_chunk: int) -> Iterable[list]:
    """Work items of ``samples_per_chunk`` samples at a time (each sample is encoded once per chunk)."""
    for start in range(0, len(groups), samples_per_chunk):
        yield [item for group in groups[start:start + samples_per_chunk] for item in group]


def _batches(group: list[tuple[EvalSample, Configuration]], size: int, mix: bool) -> Iterable[list]:
    """Batches of one configuration each, or (``mix``) fixed configurations mixed; the router apart.

    A batch runs one token-reduction spec (it is a per-call argument), so ``mix`` mixes only the
    configurations of one spec.
    """
    lanes = []
    for reduction in dict.fromkeys(c.reduction_key for _, c in group):
        part = [item for item in group if item[1].reduction_key == reduction]
        routed = [item for item in part if item[1].sa_layers == ROUTER]
        fixed = [item for item in part if item[1].sa_layers != ROUTER]
        if mix:
            lanes += [fixed, routed]
        else:
            labels = dict.fromkeys(c.label for _, c in fixed)
            lanes += [[item for item in fixed if item[1].label == label] for label in labels] + [routed]
    for lane in lanes:
        for start in range(0, len(lane), size):
            yield lane[start:start + size]


def _prepare(processor, sample: EvalSample, on_error: str, skipped: list[dict], token_reduction: Any = None,
             context: tuple[int, int] | None = None):
    """The sample's prompt, or None (recorded in ``skipped``) when it is broken or too long.

    ``context``: ``(max_position_embeddings, max_new_tokens)``; a prompt whose answer would run
    past the model's context is refused before it is generated (a 1 MB question would otherwise
    run for many minutes and answer nothing reliable).
    """
    try:
        encoded = encode_prompt(processor, sample.question, sample.images(), token_reduction)
        length = encoded["input_ids"].shape[0]
        if context is not None and length + context[1] > context[0]:
            # Refused, not truncated: a cut question is another question, and its score would be a guess.
            raise DataError(f"the prompt is {length} tokens; with --max-new-tokens {context[1]} it passes the "
                            f"model's context of max_position_embeddings={context[0]}; shorten the question")
        return encoded
    except (DataError, ValueError) as err:
        message = str(err) if str(err).startswith(sample.source) else f"{sample.source}[{sample.index}]: {err}"
        if token_reduction is not None and _encodes(processor, sample):
            # The spec, not the sample, is wrong (e.g. a 'keep' count above the tile's tokens): skipping
            # would drop the sample from every column, the ones without the spec too.
            raise DataError(f"--token-reduction {reduction_label(token_reduction)} does not fit the data: "
                            f"{message}") from err
        if on_error == "fail":
            raise DataError(message) from err
        log.warning("skipping a broken sample: %s", message)
        skipped.append({"dataset": sample.dataset, "file": sample.source, "index": sample.index, "error": message,
                        "sample": sample.key})
        return None


def _encodes(processor, sample: EvalSample) -> bool:
    """Whether the sample's prompt encodes without a token reduction."""
    try:
        encode_prompt(processor, sample.question, sample.images())
    except (DataError, ValueError):
        return False
    return True


def _run_batch(model, processor, batch, encoded, max_new_tokens, run, expected) -> list[dict[str, Any]]:
    configs = [c.sa_layers for _, c in batch]
    if all(c == ROUTER for c in configs):
        sa_layers = ROUTER
    elif model.plan.dense:
        sa_layers = "all"
    else:
        sa_layers = [list(c) for c in configs]
    spec = batch[0][1].token_reduction  # one spec per batch (_batches)
    results = generate_batch(model, processor, [encoded[s.key, c.reduction_key] for s, c in batch], sa_layers,
                             max_new_tokens, token_reduction=spec)
    shown = {k: run[k] for k in ("model", "max_new_tokens", "checkpoint", "dtype") if k in run}
    records = []
    for (sample, config), result in zip(batch, results, strict=True):
        cost = sample_cost(model.cfg, result.n_visual, result.n_text, result.sa_layers, result.tokens, spec)
        fingerprint = expected.get((sample.key, config.label))
        records.append({
            **shown, **({"fingerprint": fingerprint} if fingerprint else {}), "sample": sample.key, "dataset": sample.dataset, "index": sample.index, "category": sample.category,
            "configuration": config.label, "sa_layers": result.sa_layers, "token_reduction": spec,
            "prediction": result.text,
            "answers": sample.answers, "metric": sample.metric,
            "score": score(sample.metric, result.text, sample.answers, **sample.metric_options),
            "n_visual": result.n_visual, "n_text": result.n_text, "generated_tokens": result.tokens,
            **cost, "seconds": result.seconds,
        })
    return records
