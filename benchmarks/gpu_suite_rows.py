"""Measurement machinery of the GPU suite (``gpu_suite.py``): rows, timing, batch search, decode.

A *row* is one way of running the same inputs: transformers' LLaVA-OneVision, visorlib's dense
model, or the VISOR model under one configuration. Every row offers the same four operations
(end-to-end prefill, the language model alone on pre-embedded inputs, a cache-filling prefill and
one decode step), so each section of the suite measures all rows with one loop, interleaved.

Timing rules (every number the suite records follows them):

* the device is synchronised before the clock starts and before it stops;
* every function runs once untimed first (allocator growth, kernel selection, lazy init);
* rows are timed round-robin (row A, row B, ..., then again), so a clock or thermal drift during
  the run spreads over all rows instead of biasing the ones measured last;
* the median of the rounds is reported, with the minimum beside it.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from visor_bench import language_model_forward  # noqa: E402 - the benchmark folder is not a package

SKIPPED = "skipped: time budget"


class Budget:
    """Wall-clock budget of the whole run; sections ask it before they start work.

    Args:
        seconds: Total seconds the suite may use, model building included.
        scale: Factor on the seconds a section says it needs (its estimate is for real-size models).
    """

    def __init__(self, seconds: float, scale: float = 1.0):
        self.seconds, self.scale = seconds, scale
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the suite started."""
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds still available (negative once overrun)."""
        return self.seconds - self.elapsed()

    def allows(self, need: float = 0.0) -> bool:
        """Whether ``need`` more seconds (times ``scale``: smoke runs need a fraction) fit in the budget."""
        return self.left() > need * self.scale


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is the device running out of memory (the batch search's stop signal)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device blocks; ``collect`` also runs the garbage collector.

    Collection is for after an OOM only (the exception's traceback frames can hold the tensors of
    the failed attempt): with torch and transformers loaded one ``gc.collect()`` costs ~1 s.
    """
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call of ``fn``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def search_max_batch(run: Callable[[int], object], cap: int, device: torch.device, budget: Budget,
                     probe_seconds: float = 20.0) -> dict:
    """The largest power-of-two batch (up to ``cap``) that ``run(batch)`` completes without OOM.

    Doubling stops at the first OOM (caught, memory freed), at ``cap``, when one probe took longer
    than ``probe_seconds`` (the next would take twice as long) or when the budget runs out.

    Returns:
        ``{"batch": largest batch that ran (0 if even 1 did not), "stopped_by": why the search ended}``.
    """
    batch, stopped = 0, "cap"
    candidate = 1
    while candidate <= cap:
        seconds = None
        try:
            seconds = timed(lambda b=candidate: run(b), device)
        except RuntimeError as err:
            if not is_oom(err):
                raise
        if seconds is None:  # freed outside the except block, once the traceback's frames are gone
            free_memory(device, collect=True)
            stopped = f"out of memory at batch {candidate}"
            break
        batch = candidate
        if candidate * 2 > cap:
            break
        if seconds > probe_seconds:
            stopped = f"probe time ({seconds:.1f} s at batch {candidate})"
            break
        if not budget.allows(4 * seconds):
            stopped = "time budget"
            break
        candidate *= 2
    free_memory(device)
    return {"batch": batch, "stopped_by": stopped}


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                      budget: Budget, warm_up: bool = True) -> dict[str, dict]:
    """Warm each function up once, then time all of them round-robin ``repeats`` times.

    At least one timed round always runs; later rounds are dropped when the budget runs out.
    ``warm_up=False`` when every function has just run untimed already (the batch search's probes).

    Returns:
        ``{label: {"seconds": median, "seconds_min": min, "rounds": n}}``.
    """
    for fn in fns.values() if warm_up else ():
        fn()
    runs: dict[str, list[float]] = {label: [] for label in fns}
    for round_index in range(max(1, repeats)):
        if round_index and not budget.allows(sum(r[-1] for r in runs.values()) + 5):
            break
        for label, fn in fns.items():
            runs[label].append(timed(fn, device))
    return {label: {"seconds": statistics.median(r), "seconds_min": min(r), "rounds": len(r)} for label, r in runs.items()}


class VisorlibRow:
    """visorlib's model (dense, or VISOR under one configuration) behind the row interface.

    Args:
        label: Name in the tables.
        model: A visorlib model.
        sa_layers: The configuration (None for a dense model); one list for the whole batch, or
            one list per sample.
    """

    library = "visorlib"

    def __init__(self, label: str, model, sa_layers=None):
        self.label, self.model, self.sa_layers = label, model, sa_layers

    def end_to_end(self, inputs: dict) -> torch.Tensor:
        """Vision tower + language model, last-position logits only (what generation needs)."""
        return self.model(**inputs, sa_layers=self.sa_layers, logits_to_keep=1).logits[:, -1]

    def embed(self, inputs: dict) -> tuple:
        """Pre-embedded inputs for :meth:`language_model` (the vision tower runs here, untimed)."""
        ids = inputs["input_ids"]
        embeds, visual, segments = self.model.embed(ids, inputs["pixel_values"], inputs["image_sizes"])
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return (embeds, positions, inputs["attention_mask"], visual, segments, ids)

    def language_model(self, parts: tuple) -> torch.Tensor:
        """Decoder (+ cross-attention) and the LM head at the last position."""
        return language_model_forward(self.model, parts, slice(None), self.sa_layers)

    def prefill(self, inputs: dict) -> tuple[dict, torch.Tensor]:
        """Fill a KV cache with the prompt; returns the decode state and the last position's logits."""
        cache = self.model.new_cache()
        logits = self.model(**inputs, cache=cache, sa_layers=self.sa_layers, logits_to_keep=1).logits[:, -1]
        return {"cache": cache, "mask": inputs["attention_mask"]}, logits

    def step(self, state: dict, token: torch.Tensor) -> torch.Tensor:
        """One decode step: feed ``token [B, 1]``, return the logits ``[B, vocab]`` of the next one."""
        state["mask"] = torch.cat([state["mask"], torch.ones_like(token)], dim=1)
        return self.model(token, state["mask"], cache=state["cache"]).logits[:, -1]

    def kv_bytes_per_sample(self, state: dict) -> int:
        """Bytes of valid keys/values the first sample holds in the cache."""
        return int(state["cache"].nbytes_per_sample()[0])


class _Captured(Exception):
    """Raised by the capture hook to stop transformers' forward once the LLM inputs are known."""


class TransformersRow:
    """transformers' ``LlavaOnevisionForConditionalGeneration`` behind the row interface.

    Args:
        label: Name in the tables.
        model: The transformers model (attention implementation already set).
    """

    library = "transformers"

    def __init__(self, label: str, model):
        self.label, self.model = label, model
        # transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def end_to_end(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]

    def embed(self, inputs: dict) -> dict:
        """The exact keyword arguments transformers passes to its Qwen2 model (a pre-forward hook
        records them and aborts the forward, so the decoder does not run here)."""
        captured: dict = {}

        def hook(_module, _args, kwargs):
            captured.update(kwargs)
            raise _Captured

        handle = self.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "inputs_embeds" not in captured:
            raise RuntimeError("transformers' LLaVA-OneVision did not call its language model with inputs_embeds")
        captured["use_cache"] = False
        captured.pop("past_key_values", None)
        captured.pop("cache", None)
        return captured

    def language_model(self, parts: dict) -> torch.Tensor:
        hidden = self.model.model.language_model(**parts).last_hidden_state
        return self.model.lm_head(hidden[:, -1:])

    def prefill(self, inputs: dict) -> tuple[dict, torch.Tensor]:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        state = {"cache": getattr(out, self.cache_name), "mask": inputs["attention_mask"]}
        return state, out.logits[:, -1]

    def step(self, state: dict, token: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(token)], dim=1)
        out = self.model(input_ids=token, attention_mask=state["mask"], use_cache=True, logits_to_keep=1,
                         **{self.cache_name: state["cache"]})
        return out.logits[:, -1]

    def kv_bytes_per_sample(self, state: dict) -> int:
        cache = state["cache"]
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise RuntimeError(f"unknown transformers cache type {type(cache).__name__} (no .layers)")
        total = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
                    if isinstance(t, torch.Tensor))
        return int(total // state["mask"].shape[0])


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``[B, vocab]`` logits -> ``[B, 1]`` next tokens."""
    return logits.argmax(-1, keepdim=True)


def teacher_forced_logits(row, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the prefill and of each decode step fed ``tokens [B, n]``: ``[B, n + 1, vocab]``.

    Feeding both libraries the same tokens makes their decode paths comparable step by step even
    where a near-tie would let greedy choices diverge.
    """
    state, logits = row.prefill(inputs)
    out = [logits]
    for i in range(tokens.shape[1]):
        out.append(row.step(state, tokens[:, i : i + 1]))
    return torch.stack(out, dim=1)


def decode_rows(rows: list, inputs: dict, steps: int, rounds: int, device: torch.device, budget: Budget) -> dict:
    """Decode tokens/s of every row from the same prompt, interleaved round by round.

    Each row is prefilled once (untimed; peak memory and KV bytes recorded), decodes two warm-up
    steps, then all rows decode ``steps`` tokens per round, round-robin, for ``rounds`` rounds.

    Returns:
        ``{label: {"tokens_per_s", "ms_per_step", "kv_bytes_per_sample", "peak_memory_bytes",
        "peak_extra_bytes"}}``; memory fields are None off CUDA. A row whose prefill or warm-up
        fails gets ``{"status": "error: ..."}`` and the others are still measured.
    """
    batch = inputs["input_ids"].shape[0]
    states, tokens, out, working = {}, {}, {}, []
    for row in rows:
        free_memory(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        failure = None
        try:
            state, logits = row.prefill(inputs)
            token = greedy(logits)
            for _ in range(2):
                token = greedy(row.step(state, token))
            sync(device)
        except Exception as err:  # noqa: BLE001 - a row that fails (OOM, API change) is recorded, not fatal
            failure = f"error: {type(err).__name__}: {err}"
        if failure is not None:
            out[row.label], state = {"status": failure}, None
            free_memory(device, collect=True)
            continue
        working.append(row)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        states[row.label], tokens[row.label] = state, token
        out[row.label] = {"kv_bytes_per_sample": row.kv_bytes_per_sample(state), "peak_memory_bytes": peak,
                          "peak_extra_bytes": None if peak is None else peak - before, "seconds": []}
    for round_index in range(max(1, rounds)):
        if round_index and not budget.allows(sum(o["seconds"][-1] for o in out.values() if "seconds" in o) + 5):
            break
        for row in working:
            def run(row=row):
                for _ in range(steps):
                    tokens[row.label] = greedy(row.step(states[row.label], tokens[row.label]))
            out[row.label]["seconds"].append(timed(run, device))
    for result in out.values():
        if "status" in result:
            continue
        seconds = statistics.median(result.pop("seconds"))
        result["ms_per_step"] = 1000 * seconds / steps
        result["tokens_per_s"] = batch * steps / seconds
    return out


def profile_summary(fns: dict[str, Callable[[], object]], device: torch.device, rows: int = 12) -> dict:
    """``torch.profiler`` key averages of one call of each function (already warmed up).

    Returns:
        ``{label: {"table": text table, "top": [{"name", "self_ms", "calls"}, ...]}}``, sorted by
        self device time on CUDA and self CPU time otherwise.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda" and not hasattr(torch.autograd.profiler_util.FunctionEventAvg(), key):
        key = "self_cuda_time_total"  # the name before torch 2.4
    summary = {}
    for label, fn in fns.items():
        sync(device)
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        averages = prof.key_averages()
        top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
        summary[label] = {
            "sorted_by": key,
            "table": averages.table(sort_by=key, row_limit=rows),
            "top": [{"name": e.key, "self_ms": getattr(e, key) / 1000, "calls": e.count} for e in top],
        }
    return summary
