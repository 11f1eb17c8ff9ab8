"""The GPU suite (benchmarks/gpu_suite.py) proven on the CPU before any device time is spent.

The smoke run builds the tiny cards in transformers and visorlib from the same weights and goes
through every section (correctness, prefill at both token counts in both modes, decode, mixed
configurations, profiler); its numbers are meaningless but its wiring and its correctness checks
are real. The helpers (batch search, interleaving, time budget) are tested directly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_suite  # noqa: E402
import gpu_suite_rows as rows  # noqa: E402

ROWS = ["transformers (sdpa)", "visorlib dense", "VISOR 8CA-7SA", "VISOR 8CA-5SA", "VISOR 8CA-2SA"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # A generous budget: the guard itself is tested below; here every section must run.
    done = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--device", "cpu", "--smoke",
                           "--budget-s", "300", "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), out


def test_every_section_ran(smoke):
    result, out = smoke
    assert set(result["sections"]) == {"build", *gpu_suite.OPTIONAL_SECTIONS}
    for name, value in result["sections"].items():
        assert isinstance(value, dict) and "error" not in value, (name, value)
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["transformers"]
    markdown = out.with_suffix(".md").read_text()
    for title in ("## Correctness", "## Prefill", "## Decode", "## Mixed", "## Profile", "## Targets"):
        assert title in markdown


def test_correctness_fp32(smoke):
    c32 = smoke[0]["sections"]["correctness_fp32"]
    for key in ("logits_sdpa", "decode_path_logits"):
        assert c32[key]["max_abs"] < 1e-4 and c32[key]["top1_agreement"] == 1.0, (key, c32[key])
        assert c32[key]["reference_abs_mean"] > 1e-3  # the compared logits are not trivially zero
    assert c32["greedy"]["equal"] and c32["greedy"]["steps"] == 16
    assert len(c32["greedy"]["tokens_visorlib"]) == 16
    cd = smoke[0]["sections"]["correctness_dtype"]
    assert cd["sdpa"]["max_abs"] < 1e-4
    assert cd["flash"] == "skipped: flash_attn not installed" if isinstance(cd["flash"], str) else cd["flash"]["max_abs"] < 0.1


@pytest.mark.parametrize("section", ["prefill_7371", "prefill_1485"])
def test_prefill_rows_and_ratios(smoke, section):
    data = smoke[0]["sections"][section]
    assert data["visual_tokens"] > 0 and data["tiles"] >= 2
    for mode in ("language_model", "end_to_end"):
        table = {r["row"]: r for r in data[mode]}
        assert list(table) == ROWS
        for r in table.values():
            assert r["search"]["batch"] == r["max_batch"] == 2  # the smoke cap
            for key in ("batch1_seconds", "max_batch_seconds", "samples_per_s", "speedup_batch1", "speedup_max_batch",
                        "speedup_over_analytic", "throughput_vs_transformers"):
                assert math.isfinite(r[key]) and r[key] > 0, (mode, r["row"], key)
        assert table["visorlib dense"]["analytic_flop_ratio"] == table["transformers (sdpa)"]["analytic_flop_ratio"] == 1
        ratios = [table[f"VISOR {n}"]["analytic_flop_ratio"] for n in ("8CA-7SA", "8CA-5SA", "8CA-2SA")]
        assert 1 < ratios[0] < ratios[1] < ratios[2]  # fewer SA layers, fewer FLOPs


def test_decode_kv_bytes_match_analytic(smoke):
    decode = smoke[0]["sections"]["decode"]
    assert set(decode["batches"]) == {"1", "2"}
    for table in decode["batches"].values():
        by_row = {r["row"]: r for r in table}
        assert list(by_row) == ROWS
        assert all(r["tokens_per_s"] > 0 for r in table)
        # Both dense caches hold the same keys/values; measured VISOR savings equal the analytic ones.
        assert by_row["transformers (sdpa)"]["kv_bytes_per_sample"] == by_row["visorlib dense"]["kv_bytes_per_sample"]
        for r in table:
            assert r["kv_ratio"] == pytest.approx(r["analytic_kv_ratio"], rel=0.02), r["row"]
        assert by_row["VISOR 8CA-2SA"]["kv_ratio"] > by_row["VISOR 8CA-7SA"]["kv_ratio"] > 1


def test_mixed_profile_and_targets(smoke):
    result = smoke[0]
    mixed = result["sections"]["mixed"]
    assert mixed["max_abs_logit_difference"] < 1e-4  # both strategies compute the same logits
    assert set(mixed["times"]) == {"gather per layer (one batch)", "group by configuration"}
    profile = result["sections"]["profile"]
    assert set(profile) == {"transformers (sdpa)", "visorlib dense", "VISOR 8CA-2SA"}
    assert all(entry["top"] and entry["top"][0]["self_ms"] > 0 for entry in profile.values())
    assert len(result["targets"]) == 5
    assert all(t["value"] is not None and "smoke" in t["status"] for t in result["targets"])


def test_budget_guard_skips_sections(tmp_path):
    out = tmp_path / "none.json"
    torch.set_num_threads(1)
    assert gpu_suite.main(["--device", "cpu", "--smoke", "--budget-s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "parameters" in result["sections"]["build"]  # the models are always built
    for name in gpu_suite.OPTIONAL_SECTIONS:
        assert result["sections"][name] == rows.SKIPPED
    assert all(t["status"] == "unmeasured" for t in result["targets"])


def test_without_transformers_visorlib_rows_still_run(tmp_path):
    out = tmp_path / "visorlib-only.json"
    torch.set_num_threads(1)
    assert gpu_suite.main(["--device", "cpu", "--smoke", "--no-transformers", "--no-profile", "--budget-s", "300",
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert sections["correctness_fp32"] == sections["correctness_dtype"] == gpu_suite.NO_TRANSFORMERS
    assert [r["row"] for r in sections["prefill_7371"]["language_model"]] == ROWS[1:]
    assert [r["row"] for r in sections["decode"]["batches"]["2"]] == ROWS[1:]
    status = {t["target"]: t["status"] for t in result["targets"]}
    assert status[next(t for t in status if "transformers" in t)] == "unmeasured"


def test_max_batch_search_catches_oom():
    budget = rows.Budget(100)
    tried = []

    def run(batch):
        tried.append(batch)
        if batch >= 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert rows.search_max_batch(run, 64, torch.device("cpu"), budget) == {
        "batch": 4, "stopped_by": "out of memory at batch 8"}
    assert tried == [1, 2, 4, 8]
    assert rows.search_max_batch(lambda b: None, 16, torch.device("cpu"), budget) == {"batch": 16, "stopped_by": "cap"}

    def broken(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # only OOM ends the search quietly
        rows.search_max_batch(broken, 64, torch.device("cpu"), budget)


def test_interleaved_times_round_robin():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = rows.interleaved_times(fns, 3, torch.device("cpu"), rows.Budget(100))
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one untimed warm-up each, then rounds
    assert all(t["rounds"] == 3 and t["seconds"] >= t["seconds_min"] >= 0 for t in times.values())
    calls.clear()
    rows.interleaved_times(fns, 2, torch.device("cpu"), rows.Budget(100), warm_up=False)
    assert calls == ["a", "b", "a", "b"]


def test_decode_rows_survive_a_failing_row():
    class Broken:
        label = "broken"

        def prefill(self, inputs):
            raise RuntimeError("transformers API changed")

    class Counting:
        label = "counting"

        def prefill(self, inputs):
            return {"steps": 0}, torch.zeros(1, 5)

        def step(self, state, token):
            state["steps"] += 1
            return torch.zeros(1, 5)

        def kv_bytes_per_sample(self, state):
            return 10

    out = rows.decode_rows([Broken(), Counting()], {"input_ids": torch.zeros(1, 3)}, 4, 2, torch.device("cpu"),
                           rows.Budget(100))
    assert out["broken"] == {"status": "error: RuntimeError: transformers API changed"}
    assert out["counting"]["kv_bytes_per_sample"] == 10 and out["counting"]["tokens_per_s"] > 0


def test_the_whole_prefill_benchmark_runs_and_its_models_agree(tmp_path):
    """benchmarks/whole_prefill_bench.py on the tiny card: both models give the same logits, the
    rounds are all recorded, and the op profile names ops of both libraries."""
    out = tmp_path / "whole.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "whole_prefill_bench.py"), "--smoke", "--repeats", "2",
                           "--profile-rounds", "1", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["last_logits_agreement"]["max_abs"] < 1e-4
    assert result["last_logits_agreement"]["top1_agreement"] == 1.0
    for part in ("prefill", "decode_step"):
        for library in ("visorlib", "transformers"):
            assert len(result[part][library]["rounds_s"]) == 2
    ops = result["op_differences"]["ops"]
    assert ops and all(op["visorlib_s"] >= 0 and op["transformers_s"] >= 0 for op in ops)
    assert any(op["visorlib_calls"] > 0 for op in ops) and any(op["transformers_calls"] > 0 for op in ops)
