"""How a training run stops: Ctrl-C after a completed step, and the one-line reasons of a failed save.

A Ctrl-C in the middle of an optimiser step would lose the steps since the last checkpoint and
print a long traceback. While the trainer runs, the first Ctrl-C only asks for a stop: the step
finishes, is saved, and :class:`TrainingInterrupted` says where and how to resume; a second Ctrl-C
stops at once. A failed ``torch.distributed.checkpoint`` save reports every rank's traceback as its
message; :func:`reason` and :func:`disk_full` dig out the one cause a user can act on.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from contextlib import contextmanager

from torch.distributed.checkpoint.api import CheckpointException


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a completed step; the message says what was saved and how to resume."""


def causes(err: BaseException | None) -> list[BaseException]:
    """``err``, what it was raised from, and each rank's exception inside a DCP ``CheckpointException``
    (whose own text is every rank's traceback)."""
    out: list[BaseException] = []
    while err is not None and len(out) < 16:
        out.append(err)
        if isinstance(err, CheckpointException):
            for failure in err.failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, BaseException):
                    out += causes(inner)
            break
        err = err.__cause__ or err.__context__
    return out


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` comes from ENOSPC (directly, chained, or on any rank of a DCP save)."""
    return any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in causes(err))


def reason(err: BaseException) -> str:
    """The innermost message of ``err`` on one line (DCP's own is a traceback per rank)."""
    cause = next((e for e in reversed(causes(err)) if not isinstance(e, CheckpointException)), err)
    return " ".join(f"{type(cause).__name__}: {cause}".split())[:300]


@contextmanager
def stop_on_sigint(enabled: bool):
    """While training, Ctrl-C asks for a stop after the current step (which is then saved) instead
    of killing the step midway; a second Ctrl-C interrupts at once. Yields the request flag (a list)."""
    requested: list[bool] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def ask(signum, frame):
        requested.append(True)
        signal.signal(signal.SIGINT, previous)  # the next Ctrl-C raises KeyboardInterrupt as usual
        print("\nvisorlib train: Ctrl-C: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to stop at once, losing the steps since the last save)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)
