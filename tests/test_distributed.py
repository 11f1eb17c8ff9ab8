"""torchrun + FSDP2 on CPU (gloo): two processes compute what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import synth, write_recipe  # noqa: F401 - the synthetic-data fixture

from visorlib.train import Trainer, load_recipe


def test_two_processes_equal_one(tmp_path, synth):  # noqa: F811
    recipe = write_recipe(tmp_path, synth, training={"global_batch_size": 4, "max_steps": 3},
                          data={"micro_batch_size": 2})
    single = Trainer(load_recipe(recipe))
    expected = [single.train_step() for _ in range(3)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    worker = Path(__file__).parent / "dist_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(worker), str(recipe), str(tmp_path), "3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    # Every rank sampled the same configuration at every step, and the one process did too.
    assert ranks[0]["configuration"] == ranks[1]["configuration"] == [m["configuration"] for m in expected]
    for rank in ranks:
        assert rank["loss"] == pytest.approx([m["loss"] for m in expected], rel=1e-5)
        assert rank["grad_norm"] == pytest.approx([m["grad_norm"] for m in expected], rel=1e-4)
