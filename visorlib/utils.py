"""Small helpers every layer may use: readable counts and wall-clock timing that waits for the device.

They were private parts of :mod:`visorlib.profiling` that evaluation and the CLI reached into; they
live here, below everything that uses them, and import nothing of visorlib (torch only when a
device is synchronised, so ``visorlib --help`` stays light).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def human(n: float, unit: str = "") -> str:
    """``1.23 G``-style rendering of a count."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def synchronize(device: Any) -> None:
    """Wait for queued work on ``device`` (a CUDA device; nothing to wait for on the CPU), so a clock reads it."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeats: int, device: Any) -> float:
    """Best wall-clock seconds of ``fn`` over ``repeats`` runs (at least one), the device synchronised around each."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
