"""Continuous batching: one thread owns the model and interleaves prefills with decode steps.

The loop, once per iteration:

1. **admit** — take waiting requests while the decode batch has room (``--max-batch``), prefill
   them in one forward pass per group (requests under the router, and requests under fixed
   configurations, are two groups: the router decides inside the pass; a group may mix fixed
   configurations freely, the executor gathers per layer; different token reductions are
   different groups). Each prefill fills a cache of its own and yields the first token.
2. **join** — the new rows' caches are stacked onto the running batch's
   (:func:`~visorlib.serve.batch.concat_caches`).
3. **decode** — one forward pass of one new token for every running row, whatever its
   configuration (the cache holds it), then one token chosen per row.
4. **leave** — rows that finished (end of sequence, a stop string, ``max_tokens``) or were
   cancelled (the client went away) are dropped at once (:func:`~visorlib.serve.batch.select_rows`).

A row's tokens are those of ``model.generate`` on its request alone: the same prefill and decode
computations per row (padding is masked out), the same suppressed ids, greedy argmax or sampling
from the request's own seeded generator. Results go back to the web server's event loop through
:meth:`Sequence.emit`; the loop never blocks on a client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..eval.runner import left_padded_batch, sample_cost
from ..generation import filter_logits
from .batch import concat_caches, select_rows
from .metrics import Metrics
from .prepare import Prepared
from .protocol import APIError

log = logging.getLogger("visorlib.serve")


class Sequence:
    """One request inside the scheduler: its tokens, text and where to send what happens.

    Events are tuples put on the handler's asyncio queue: ``("started",)`` (the first token is
    chosen), ``("delta", text)``, ``("done", finish_reason, usage)`` or ``("error", APIError)``.
    """

    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 decode: Callable[[list[int]], str], eos: set[int], cost: Callable[[Sequence], dict[str, Any]]):
        self.prepared, self.loop, self.queue, self.decode, self.eos = prepared, loop, queue, decode, eos
        self.cost = cost
        request = prepared.request
        self.generator = None
        if not request.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        self.tokens: list[int] = []  # generated ids, the end-of-sequence id excluded
        self.generated = 0  # generated ids, the end-of-sequence id included (what FLOPs count)
        self.sent = ""  # text already emitted
        self.finished: str | None = None  # finish_reason once done
        self.cancelled = False
        self.executed: list[int] | None = None
        self.submitted = time.monotonic()
        self.holdback = max((len(s) for s in request.stop), default=1) - 1

    def cancel(self) -> None:
        """Called from the event loop when the client is gone: the row leaves at the next step."""
        self.cancelled = True

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody listens
            self.cancelled = True

    def push(self, token: int) -> None:
        """Record one generated token; emit the new text; finish on eos, a stop string or the budget."""
        request = self.prepared.request
        self.generated += 1
        if self.generated == 1:
            self.emit("started")  # the first token exists (a stream's headers go out now)
        if token in self.eos and not request.ignore_eos:
            self.finished = "stop"
        else:
            self.tokens.append(token)
        text = self.decode(self.tokens)
        cuts = [text.find(s) for s in request.stop if s in text]
        if cuts:
            text, self.finished = text[: min(cuts)], "stop"
        if self.finished is None and self.generated >= request.max_tokens:
            self.finished = "length"
        # Hold back what could still become a stop string or is half a multi-byte character.
        safe = text if self.finished else text[: len(text) - self.holdback] if self.holdback else text
        if not self.finished and safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")
        if safe.startswith(self.sent) and len(safe) > len(self.sent):
            self.emit("delta", safe[len(self.sent):])
            self.sent = safe
        if self.finished:
            self.emit("done", self.finished, self.usage())

    def usage(self) -> dict[str, Any]:
        """OpenAI's ``usage`` plus what VISOR ran and what it cost (the numbers ``visorlib eval`` reports)."""
        p = self.prepared
        return {"prompt_tokens": p.prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": p.prompt_tokens + self.generated, "visor": self.cost(self)}


class Scheduler:
    """Owns the model; serves :class:`Sequence` s with continuous batching (see the module docstring).

    Args:
        model: The served model (eval mode).
        processor: Its processor (decodes text).
        max_batch: Most sequences decoded together.
        max_queue: Most requests waiting; past it :meth:`submit` answers 429.
        metrics: Counters to update.
    """

    def __init__(self, model, processor, max_batch: int, max_queue: int, metrics: Metrics):
        self.model, self.processor, self.metrics = model, processor, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = set(model.cfg.tokens.eos_token_ids)
        pad = processor.tokenizer.pad_token_id
        self.pad = model.cfg.tokens.pad_token_id if pad is None else pad
        self.suppressed = torch.tensor(model.suppressed_token_ids(model.cfg.decoder.vocab_size), dtype=torch.long)
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.cache = self.mask = None
        self.last = torch.empty(0, dtype=torch.long)  # each running row's newest token
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="visorlib-scheduler", daemon=True)

    # -- the web server's side -----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Sequence:
        """Queue a request; raises a 429 :class:`APIError` when the queue is full (503 when stopping)."""
        seq = Sequence(prepared, loop, queue, self.processor.decode, self.eos, self._cost)
        with self.cond:
            if self.stopping:
                raise APIError("the server is shutting down", None, 503)
            if len(self.waiting) >= self.max_queue:
                raise APIError(f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                               f"{self.max_queue}); retry later", None, 429, headers={"Retry-After": "1"})
            self.waiting.append(seq)
            self.metrics.queue_depth = len(self.waiting)
            self.cond.notify()
        return seq

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running get a 503 error event."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.active:
                    self.cond.wait()
                if self.stopping:
                    break
                admitted = []
                while self.waiting and len(self.active) + len(admitted) < self.max_batch:
                    seq = self.waiting.popleft()
                    if not seq.cancelled:
                        admitted.append(seq)
                    else:
                        self.metrics.requests["cancelled"] += 1
                self.metrics.queue_depth = len(self.waiting)
            try:
                with torch.inference_mode():
                    if admitted:
                        self._admit(admitted)
                    if self.active:
                        self._decode()
            except Exception as err:  # a bug, not a bad request: fail what is running, keep serving
                log.exception("scheduler step failed")
                for seq in dict.fromkeys([*admitted, *self.active]):
                    if not seq.finished:
                        seq.emit("error", APIError(f"internal error while generating: {type(err).__name__}: {err}",
                                                   None, 500))
                self._keep([])
            self.metrics.batch_size = len(self.active)
        with self.cond:
            for seq in [*self.waiting, *self.active]:
                seq.emit("error", APIError("the server is shutting down", None, 503))
            self.waiting.clear()
            self.active = []

    def _admit(self, admitted: list[Sequence]) -> None:
        groups: dict[tuple, list[Sequence]] = {}
        for seq in admitted:
            p = seq.prepared
            groups.setdefault((p.sa_layers == "router", p.reduction_key), []).append(seq)
        caches, masks, joined, firsts = [], [], [], []
        for (routed, _), group in groups.items():
            for part in self._prefill_isolating(group, routed):
                cache, mask, logits, seqs = part
                tokens = self._choose(logits, seqs)
                keep = []
                for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
                    seq.push(token)
                    if seq.finished:
                        self._done(seq)
                    else:
                        keep.append(row)
                if keep:
                    if len(keep) < len(seqs):
                        cache, mask = select_rows(cache, mask, keep)
                    caches.append(cache)
                    masks.append(mask)
                    joined += [seqs[r] for r in keep]
                    firsts += [tokens[r] for r in keep]
        if not joined:
            return
        if self.active:
            caches, masks = [self.cache, *caches], [self.mask, *masks]
        self.cache, self.mask = concat_caches(caches, masks)
        self.active += joined
        self.last = torch.cat([self.last, torch.tensor(firsts, dtype=torch.long)])

    def _prefill_isolating(self, group: list[Sequence], routed: bool):
        """Prefill ``group`` in one pass; if the model refuses the batch, each alone (only the culprit fails)."""
        try:
            return [self._prefill(group, routed)]
        except ValueError as err:
            if len(group) == 1:
                self._fail(group[0], APIError(f"'messages': {err}", "messages"))
                return []
        parts = []
        for seq in group:
            try:
                parts.append(self._prefill([seq], routed))
            except ValueError as err:
                self._fail(seq, APIError(f"'messages': {err}", "messages"))
        return parts

    def _prefill(self, seqs: list[Sequence], routed: bool):
        first = seqs[0].prepared
        batch = left_padded_batch([s.prepared.inputs for s in seqs], self.pad, self.device)
        if routed:
            sa_layers = "router"
        elif first.sa_layers is None:
            sa_layers = None  # a dense model
        else:
            sa_layers = [s.prepared.sa_layers for s in seqs]
        cache = self.model.new_cache()
        out = self.model(**batch, cache=cache, logits_to_keep=1, sa_layers=sa_layers,
                         token_reduction=first.request.token_reduction)
        self.metrics.prefills += 1
        executed = out.sa_layers
        for row, seq in enumerate(seqs):
            seq.executed = None if first.sa_layers is None else list(executed[row])
            p = seq.prepared
            self.metrics.prompt_tokens += p.prompt_tokens
        return cache, batch["attention_mask"], out.logits[:, -1], seqs

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row, as ``generate`` picks it: suppressed ids out, then argmax or a seeded sample."""
        if len(self.suppressed):
            logits = logits.index_fill(-1, self.suppressed.to(logits.device), float("-inf"))
        tokens = logits.argmax(-1).tolist()
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                request = seq.prepared.request
                probs = filter_logits(logits[row: row + 1].float(), request.temperature, 0, request.top_p).softmax(-1)
                tokens[row] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
        self.metrics.generated(len(seqs))
        return tokens

    def _decode(self) -> None:
        gone = [row for row, seq in enumerate(self.active) if seq.cancelled]
        if gone:
            self.metrics.requests["cancelled"] += len(gone)
            self._keep([r for r in range(len(self.active)) if r not in gone])
            if not self.active:
                return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        out = self.model(input_ids=self.last[:, None].to(self.device), attention_mask=self.mask, cache=self.cache)
        self.metrics.steps += 1
        tokens = self._choose(out.logits[:, -1], self.active)
        keep = []
        for row, (seq, token) in enumerate(zip(self.active, tokens, strict=True)):
            seq.push(token)
            if seq.finished:
                self._done(seq)
            elif seq.cancelled:  # the client left during this step
                self.metrics.requests["cancelled"] += 1
            else:
                keep.append(row)
        self.last = torch.tensor(tokens)
        if len(keep) < len(self.active):
            self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        self.active = [self.active[r] for r in rows]
        if rows:
            self.cache, self.mask = select_rows(self.cache, self.mask, rows)
            self.last = self.last[rows]
        else:
            self.cache = self.mask = None
            self.last = self.last[:0]

    def _done(self, seq: Sequence) -> None:
        self.metrics.requests["ok"] += 1
        self.metrics.configurations[seq.prepared.label if seq.executed is None else _label(seq.executed)] += 1

    def _cost(self, seq: Sequence) -> dict[str, Any]:
        """What ran and what it cost: the configuration, token counts, analytic LLM FLOPs and KV bytes."""
        p = seq.prepared
        n_text = p.prompt_tokens - p.visual_tokens
        cost = sample_cost(self.model.cfg, p.visual_tokens, n_text, seq.executed, seq.generated,
                           p.request.token_reduction)
        return {"sa_layers": seq.executed, "configuration": p.label if seq.executed is None else _label(seq.executed),
                "routed": p.sa_layers == "router", "visual_tokens": p.visual_tokens, "text_tokens": n_text,
                "llm_flops": cost["flops"], "prefill_llm_flops": cost["prefill_flops"], "kv_cache_bytes": cost["kv_bytes"]}

    def _fail(self, seq: Sequence, error: APIError) -> None:
        seq.emit("error", error)  # counted by the web server, which answers with it


def _label(config: list[int]) -> str:
    return ",".join(str(i) for i in config) or "none"
