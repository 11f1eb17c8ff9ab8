"""Checks of command-line arguments, shared by every ``visorlib`` subcommand.

A leaf module (it imports nothing of visorlib), so the subcommands that live beside their
feature (``visorlib.eval.cli``, ``visorlib.demo``) use these without importing ``visorlib.cli``,
which imports them to build its parser.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class UsageError(ValueError):
    """A command-line argument that cannot work (named in the message)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def int_between(low: int, high: int):
    """argparse type: an integer in ``[low, high]`` (for sizes whose excess would exhaust memory)."""

    def parse(text: str) -> int:
        value = _int_at_least(text, low)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = f"integer from {low} to {high}"  # what argparse names in 'invalid ... value'
    return parse


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else f'>= {low}'}, got {value}")
    return value


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before any work is done.

    Raises:
        UsageError: ``path`` is a directory, or its folder is missing or not writable.
    """
    if path is None:
        return
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def check_device(name: str):
    """The ``--device`` value as a torch device, refused when this machine does not have it."""
    import torch  # here: `visorlib --help` builds the parsers without loading torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name!r}: MPS is not available on this machine")
    return device


def seconds_since_process_start() -> float | None:
    """Wall-clock seconds since this process started (Linux ``/proc``), imports included; None elsewhere.

    What a user waited for: a command's own timer starts after ``import torch`` and the model
    code have loaded, several seconds on a small machine.
    """
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None
