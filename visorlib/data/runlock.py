"""One training per run folder: an exclusive lock on ``checkpoint.dir``, and a writability check.

Two trainings writing into one folder overwrite each other's checkpoints and leave folders that
look complete but mix both runs, so the trainer takes :class:`RunLock` for as long as it writes.

Why ``fcntl.flock`` on a ``.lock`` file rather than an ``O_EXCL`` lock file:

* The kernel drops a ``flock`` when its holder dies, however it dies (``kill -9``, OOM killer,
  power loss of a node). An ``O_EXCL`` file survives its writer, so every crash would leave a
  stale lock that someone has to judge (is pid 1234 still that run? is it alive on its host?)
  and two runs starting at once could both decide it is stale and both take it.
* ``flock`` locks belong to an open file, not a process, so a second ``Trainer`` in the *same*
  process is refused too (``fcntl``/POSIX record locks would let it through).

The file also records the holder (pid, host, start time, recipe), only to name it in the error
message: a record left by a holder that died (the file is not locked, but not empty) is reported
as a stale lock and taken over, which is safe because the kernel grants the lock to one taker
only. Filesystems without ``flock`` support (some cluster filesystems) get a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger("visorlib.train")


class RunDirError(RuntimeError):
    """``checkpoint.dir`` cannot be used: another training holds it, or it is not writable."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock on a run folder (``<folder>/.lock``).

    Args:
        folder: The run folder (``checkpoint.dir``); created if missing.
        owner: Words describing the holder in the lock record (e.g. the recipe path).
        name: The lock file's name in ``folder`` (another name locks something narrower than
            the folder, e.g. one predictions file of ``visorlib eval``).
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, owner: str = "", name: str | None = None):
        self.folder, self.owner = Path(folder), owner
        self.path = self.folder / (name or self.NAME)
        self.handle = None

    @property
    def held(self) -> bool:
        return self.handle is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirError` naming the holder's pid and host."""
        if self.handle is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._describe(handle.read())
            handle.close()
            if "(exited" in holder:  # a child that inherited the lock (e.g. a DataLoader worker) still runs
                holder += "; its child processes still hold the lock, retry when they are gone"
            raise RunDirError(self.busy_message(holder)) from None
        except OSError as err:
            handle.close()
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("the filesystem of %s does not support file locks (%s): running without the "
                            "one-training-per-folder lock", self.folder, err.strerror)
                return
            raise
        previous = handle.read().strip()
        if previous:
            log.warning("taking over a stale lock on %s: %s", self.folder, self._describe(previous, stale=True))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"), "owner": self.owner}) + "\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        """Release the lock (emptying the record: an empty file means "cleanly released")."""
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()

    def busy_message(self, holder: str) -> str:
        """The error when another process holds the lock (``holder``: who, in words)."""
        return (f"checkpoint.dir {self.folder} is in use by another training ({holder}); wait for it "
                "to finish or use another checkpoint.dir")

    @staticmethod
    def _describe(text: str, stale: bool = False) -> str:
        """The holder record in words; ``stale``: the record of a holder that no longer holds the lock."""
        try:
            record = json.loads(text)
            pid, host = int(record["pid"]), str(record["host"])
        except (ValueError, KeyError, TypeError):
            return "holder unknown"
        words = f"pid {pid} on host {host}, since {record.get('since', '?')}"
        if record.get("owner"):
            words += f", {record['owner']}"
        here = host == socket.gethostname()
        if stale:
            state = ("no longer running" if not _alive(pid) else "still running but not holding the lock") if here \
                else "on another host, not holding the lock"
            words += f" ({state})"
        elif here and not _alive(pid):
            words += " (exited)"
        return words

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(folder: str | os.PathLike, key: str, source: str) -> None:
    """Create ``folder`` and write a probe file in it, or raise :class:`RunDirError` at once.

    Checked when the trainer starts, so an unwritable output folder fails before the first
    step rather than at the first save, ``every_steps`` of work later. (A permission check such
    as ``os.access`` is not enough: it says yes to root on a read-only mount.)
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise RunDirError(f"{source}: {key} {folder} is not a writable folder "
                          f"({err.strerror or err}); fix the path or its permissions") from err
