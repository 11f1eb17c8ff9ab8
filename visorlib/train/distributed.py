"""The process group a training run sees: one process, or many under ``torchrun``.

:class:`Distributed` is the trainer's only view of it (rank, world size, barriers, sums), so the
same code path runs alone and under FSDP2; :func:`quiet_single_process` silences DCP's warning that
it runs without a process group, which is the intended single-process mode.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def quiet_single_process():
    """DCP warns that it runs without a process group; that is the intended single-process mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Distributed:
    """Rank, world size and device, from the ``torchrun`` environment (a single process otherwise)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        return self.sum_many([value])[0]

    def sum_many(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (one all-reduce for several numbers)."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()
