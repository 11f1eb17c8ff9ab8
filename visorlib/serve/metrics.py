"""Server counters and their Prometheus text exposition (``GET /metrics``).

Written by hand rather than with ``prometheus_client``: a dozen series do not justify a
dependency, and the text format (``# HELP`` / ``# TYPE`` / ``name{label="v"} value``) is simple.
Counters are bumped by the scheduler thread and the request handlers; under the GIL an ``int``
increment of one attribute is safe enough for monitoring (a lost increment would not matter).
"""

from __future__ import annotations

import collections
import threading
import time


class Metrics:
    """What ``/metrics`` reports.

    Attributes:
        requests: Finished requests by outcome (``ok``, ``error``, ``cancelled``, ``rejected``).
        configurations: Requests served per configuration label (what actually ran).
        prompt_tokens, completion_tokens: Token totals.
        queue_depth, batch_size: Current waiting requests and decode-batch rows (set by the scheduler).
    """

    WINDOW = 10.0  # seconds over which tokens/s is averaged

    def __init__(self):
        self.requests: collections.Counter[str] = collections.Counter()
        self.configurations: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = self.completion_tokens = 0
        self.queue_depth = self.batch_size = 0
        self.steps = self.prefills = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def generated(self, tokens: int) -> None:
        """``tokens`` new tokens were produced just now (one decode step or prefill)."""
        now = time.monotonic()
        with self._lock:
            self.completion_tokens += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - self.WINDOW]
        return sum(recent) / self.WINDOW

    def render(self, model: str) -> str:
        """The Prometheus text format of every series."""
        lines: list[str] = []

        def series(name: str, kind: str, help_: str, values: dict[str, float] | float, label: str = "") -> None:
            lines.append(f"# HELP visorlib_{name} {help_}")
            lines.append(f"# TYPE visorlib_{name} {kind}")
            if isinstance(values, dict):
                for key, value in sorted(values.items()):
                    lines.append(f'visorlib_{name}{{model="{model}",{label}="{_escape(key)}"}} {value}')
            else:
                lines.append(f'visorlib_{name}{{model="{model}"}} {values}')

        series("requests_total", "counter", "Finished chat-completion requests by outcome.", dict(self.requests), "outcome")
        series("configuration_requests_total", "counter", "Requests served per VISOR configuration that ran.",
               dict(self.configurations), "sa_layers")
        series("prompt_tokens_total", "counter", "Prompt tokens prefilled (visual tokens included).", self.prompt_tokens)
        series("completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens)
        series("queue_depth", "gauge", "Requests waiting for a place in the decode batch.", self.queue_depth)
        series("batch_size", "gauge", "Sequences in the running decode batch.", self.batch_size)
        series("decode_steps_total", "counter", "Decode steps run.", self.steps)
        series("prefill_batches_total", "counter", "Prefill forward passes run.", self.prefills)
        series("generation_tokens_per_second", "gauge", f"Tokens generated per second over the last {self.WINDOW:g} s.",
               round(self.tokens_per_second(), 3))
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
