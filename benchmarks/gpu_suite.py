"""GPU suite: VISOR vs visorlib dense vs transformers, every row in one run of under ~8 minutes.

One command, no network: builds LLaVA-OneVision 0.5B at real size with random weights in
transformers (``LlavaOnevisionForConditionalGeneration``), converts those weights with visorlib's
own converter (:mod:`visorlib.models.llava_onevision.convert`) into visorlib's dense model and into the VISOR model
(:func:`visorlib.visorize`, the plan of ``zoo/visor-llava-ov-0.5b.yaml``), then measures:

1. correctness: fp32 and ``--dtype`` logits of visorlib vs transformers on the same inputs (max
   and mean |delta|, top-1 agreement) with SDPA and, if installed, flash-attn; greedy tokens equal
   for 16 steps in fp32;
2. prefill at 1485 and 7371 visual tokens (384 px and 1000 px images), batch 1 and the largest
   batch found by a doubling search (OOM caught), language model alone and end to end, for
   transformers (SDPA), visorlib dense and VISOR 8CA-7SA / 8CA-5SA / 8CA-2SA, with the analytic
   FLOP ratio (:func:`visorlib.flops`) beside the measured speedup;
3. decode tokens/s at batch 1 and 32 after a 7371-token prefix, peak memory, KV bytes per sample;
4. per-sample mixed configurations in one batch vs grouped by configuration;
5. a ``torch.profiler`` summary of the language model (transformers, dense, 8CA-2SA).

Every section checks the time budget first and records ``"skipped: time budget"`` instead of
overrunning; an exception in one section is recorded and the others still run. The JSON is
rewritten after every section, so even a killed run leaves what it measured. The pieces:
``gpu_suite_models.py`` (models from one set of weights, inputs, correctness), ``gpu_suite_rows.py``
(rows, timing, batch search, decode), ``gpu_suite_report.py`` (targets, markdown). Usage::

    python benchmarks/gpu_suite.py --device cuda --dtype bfloat16 --out benchmarks/results/gpu-suite-h200.json
    python benchmarks/gpu_suite.py --device cpu --smoke --out /tmp/gpu-suite-smoke.json   # tiny, < 1 min
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite_rows as rows  # noqa: E402 - the benchmark folder is not a package
from gpu_suite_models import (  # noqa: E402
    CONFIGURATIONS,
    NO_TRANSFORMERS,
    VISOR_CARD,
    build_models,
    convert_dtype,
    correctness_dtype,
    correctness_fp32,
    flash_available,
    image_side,
    make_inputs,
    parameter_count,
    transformers_available,
    visual_tokens,
)
from gpu_suite_report import markdown, targets  # noqa: E402
from visor_bench import grouped_forward, language_model_forward  # noqa: E402

import visorlib  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL = dict(budget=480.0, max_batch=64, decode_batches=[1, 32], decode_steps=32, repeats=3, mixed_batch=6,
            greedy_steps=16)
OPTIONAL_SECTIONS = ("correctness_fp32", "correctness_dtype", "prefill_7371", "prefill_1485", "decode", "mixed", "profile")
SMOKE = dict(budget=55.0, max_batch=2, decode_batches=[1, 2], decode_steps=2, repeats=1, mixed_batch=3,
             greedy_steps=16)


# ----------------------------------------------------------------------------------- sections
def measured_rows(ctx) -> list:
    """transformers (SDPA), visorlib dense, then the VISOR configurations."""
    out = [rows.TransformersRow("transformers (sdpa)", ctx["hf"])] if ctx["hf"] is not None else []
    out.append(rows.VisorlibRow("visorlib dense", ctx["dense"]))
    out += [rows.VisorlibRow(f"VISOR {name}", ctx["visor"], config) for name, config in CONFIGURATIONS.items()]
    return out


def analytic(ctx, row, n_visual: int, n_text: int, tiles: int):
    """visorlib.flops report of a row (transformers and dense: the dense model)."""
    if isinstance(row, rows.VisorlibRow) and row.sa_layers is not None:
        return visorlib.flops(ctx["visor"], n_visual, n_text, tiles=tiles, sa_layers=row.sa_layers)
    return visorlib.flops(ctx["dense"], n_visual, n_text, tiles=tiles)


@torch.inference_mode()
def prefill_section(ctx, label: str) -> dict:
    """Prefill at one visual-token count: LLM alone and end to end, batch 1 and max batch, all rows."""
    cfg, device, settings, budget = ctx["dense"].cfg, ctx["device"], ctx["settings"], ctx["budget"]
    side = image_side(cfg, label)
    n_visual, tiles = visual_tokens(cfg, side)
    n_text = ctx["args"].text_tokens
    inputs_at: dict[int, dict] = {}
    parts_at: dict[tuple, object] = {}

    def inputs(batch):
        if batch not in inputs_at:
            inputs_at[batch] = make_inputs(cfg, side, n_text, batch, device, ctx["dtype"])
        return inputs_at[batch]

    def parts(row, batch):  # visorlib's dense and VISOR models embed identically: share
        key = (row.library, batch)
        if key not in parts_at:
            parts_at[key] = row.embed(inputs(batch))
        return parts_at[key]

    if not ctx["args"].smoke and n_visual != int(label):
        raise RuntimeError(f"a {side}-px image gives {n_visual} visual tokens, expected {label}")
    result = {"visual_tokens": n_visual, "text_tokens": n_text, "tiles": tiles}
    for mode in ("language_model", "end_to_end"):
        if not budget.allows(20):
            result[mode] = rows.SKIPPED
            continue

        def call(row, batch, mode=mode):
            if mode == "language_model":
                return lambda: row.language_model(parts(row, batch))
            return lambda: row.end_to_end(inputs(batch))

        table, fns = [], {}
        for row in measured_rows(ctx):
            if not budget.allows(10):
                table.append({"row": row.label, "status": rows.SKIPPED})
                continue
            try:
                search = rows.search_max_batch(lambda b, row=row: call(row, b)(), settings["max_batch"], device,
                                               budget)
            except Exception as err:  # noqa: BLE001 - one broken row must not cost the others' numbers
                table.append({"row": row.label, "status": f"error: {type(err).__name__}: {err}"})
                continue
            if search["batch"] == 0:
                table.append({"row": row.label, "status": search["stopped_by"]})
                continue
            report = analytic(ctx, row, n_visual, n_text, tiles if mode == "end_to_end" else 0)
            table.append({"row": row.label, "search": search,
                          "flops": report.total if mode == "end_to_end" else report.language_model})
            fns[(row.label, 1)] = call(row, 1)
            if search["batch"] > 1:
                fns[(row.label, search["batch"])] = call(row, search["batch"])
        try:
            # The search's probes ran every one of these functions at these batches: they were the warm-up.
            times = rows.interleaved_times(fns, settings["repeats"], device, budget, warm_up=False) if fns else {}
        except RuntimeError as err:
            if not rows.is_oom(err):
                raise
            times = None  # all rows' inputs together did not fit where each one alone did
        parts_at.clear()
        if times is None:
            rows.free_memory(device, collect=True)
            result[mode] = "error: out of memory while timing the rows together (rerun with a smaller --max-batch)"
            continue
        finish_prefill_rows(table, times)
        result[mode] = table
    return result


def finish_prefill_rows(table: list, times: dict) -> None:
    """Add seconds, throughput and ratios (vs visorlib dense and vs transformers) to each row."""
    for entry in table:
        if "search" not in entry:
            continue
        batch = entry["search"]["batch"]
        one = times[(entry["row"], 1)]
        top = times.get((entry["row"], batch), one)
        entry.update(batch1_seconds=one["seconds"], max_batch=batch, max_batch_seconds=top["seconds"],
                     samples_per_s=batch / top["seconds"], rounds=top["rounds"])
    measured = {e["row"]: e for e in table if "samples_per_s" in e}
    dense, hf = measured.get("visorlib dense"), measured.get("transformers (sdpa)")
    for entry in measured.values():
        if dense is not None:
            entry["analytic_flop_ratio"] = dense["flops"] / entry["flops"]
            entry["speedup_batch1"] = dense["batch1_seconds"] / entry["batch1_seconds"]
            entry["speedup_max_batch"] = entry["samples_per_s"] / dense["samples_per_s"]
            entry["speedup_over_analytic"] = entry["speedup_max_batch"] / entry["analytic_flop_ratio"]
        if hf is not None:
            entry["throughput_vs_transformers"] = entry["samples_per_s"] / hf["samples_per_s"]


@torch.inference_mode()
def decode_section(ctx) -> dict:
    """Decode tokens/s after a 7371-token prefix, at each decode batch, all rows interleaved."""
    cfg, device, settings, budget = ctx["dense"].cfg, ctx["device"], ctx["settings"], ctx["budget"]
    side = image_side(cfg, "7371")
    n_visual, _ = visual_tokens(cfg, side)
    n_text = ctx["args"].text_tokens
    element = torch.empty(0, dtype=ctx["dtype"]).element_size()
    result = {"prefix_visual_tokens": n_visual, "text_tokens": n_text, "steps": settings["decode_steps"],
              "batches": {}}
    for batch in settings["decode_batches"]:
        if not budget.allows(30):
            result["batches"][str(batch)] = rows.SKIPPED
            continue
        measured_list = measured_rows(ctx)
        inputs = make_inputs(cfg, side, n_text, batch, device, ctx["dtype"])
        measured = rows.decode_rows(measured_list, inputs, settings["decode_steps"], settings["repeats"], device,
                                    budget)
        del inputs
        rows.free_memory(device)
        dense = measured["visorlib dense"]
        dense_report = analytic(ctx, rows.VisorlibRow("visorlib dense", ctx["dense"]), n_visual, n_text, 0)
        table = []
        for row in measured_list:
            entry = {"row": row.label, **measured[row.label]}
            table.append(entry)
            if "status" in entry:  # this row failed (recorded); the others are complete
                continue
            report = analytic(ctx, row, n_visual, n_text, 0)
            entry["analytic_kv_bytes_per_sample"] = report.kv_cache_bytes // 2 * element
            entry["analytic_decode_flop_ratio"] = dense_report.decode_step / report.decode_step
            entry["analytic_kv_ratio"] = dense_report.kv_cache_bytes / report.kv_cache_bytes
            if "status" not in dense:
                entry["speedup"] = entry["tokens_per_s"] / dense["tokens_per_s"]
                entry["kv_ratio"] = dense["kv_bytes_per_sample"] / entry["kv_bytes_per_sample"]
        result["batches"][str(batch)] = table
    return result


@torch.inference_mode()
def mixed_section(ctx) -> dict:
    """Per-sample configurations in one batch (gather per layer) vs one pass per configuration."""
    visor, device, settings, budget = ctx["visor"], ctx["device"], ctx["settings"], ctx["budget"]
    cfg, n = visor.cfg, settings["mixed_batch"]
    side = image_side(cfg, "7371")
    configs = [list(CONFIGURATIONS.values())[i % len(CONFIGURATIONS)] for i in range(n)]
    inputs = make_inputs(cfg, side, ctx["args"].text_tokens, n, device, ctx["dtype"], seed=1)
    parts = rows.VisorlibRow("mixed", visor, configs).embed(inputs)
    every = list(range(n))
    fns = {"gather per layer (one batch)": lambda: language_model_forward(visor, parts, every, configs),
           "group by configuration": lambda: grouped_forward(visor, parts, configs)}
    times = rows.interleaved_times(fns, settings["repeats"], device, budget)
    delta = (fns["gather per layer (one batch)"]() - fns["group by configuration"]()).float().abs().max()
    n_visual, _ = visual_tokens(cfg, side)
    ideal = sum(visorlib.flops(visor, n_visual, ctx["args"].text_tokens, sa_layers=c).language_model for c in configs)
    return {"batch": n, "visual_tokens": n_visual, "configurations": [visor.plan.describe(c) for c in configs],
            "times": times, "max_abs_logit_difference": float(delta), "analytic_llm_flops": ideal,
            "gather_over_group": times["gather per layer (one batch)"]["seconds"] / times["group by configuration"]["seconds"]}


@torch.inference_mode()
def profile_section(ctx) -> dict:
    """torch.profiler summary of the language model alone at 7371 visual tokens, batch 1."""
    cfg = ctx["dense"].cfg
    inputs = make_inputs(cfg, image_side(cfg, "7371"), ctx["args"].text_tokens, 1, ctx["device"], ctx["dtype"])
    chosen = [r for r in measured_rows(ctx) if r.label in ("transformers (sdpa)", "visorlib dense", "VISOR 8CA-2SA")]
    fns = {}
    for row in chosen:
        parts = row.embed(inputs)
        fns[row.label] = lambda row=row, parts=parts: row.language_model(parts)
        fns[row.label]()  # warm-up, outside the trace
    return rows.profile_summary(fns, ctx["device"])


# ----------------------------------------------------------------------------------- run
def environment(device: torch.device) -> dict:
    """Device, driver and library versions of this run."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "transformers": importlib.metadata.version("transformers") if transformers_available() else None,
           "visorlib": visorlib.__version__,
           "flash_attn": importlib.metadata.version("flash_attn") if flash_available() else None,
           "threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as err:
            env["driver"] = f"unknown ({err})"
    else:
        env["device"] = platform.processor() or platform.machine() or "cpu"
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="measurement dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny models (card.tiny()), same code paths, < 1 min on CPU")
    parser.add_argument("--out", default="benchmarks/results/gpu-suite.json", help="JSON path; the .md table goes beside it")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget in seconds (default 480; smoke 55)")
    parser.add_argument("--max-batch", type=int, help="upper end of the batch search (default 64; smoke 4)")
    parser.add_argument("--repeats", type=int, help="timed rounds per row (default 3; smoke 1)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--sections", help="comma-separated subset of " + ",".join(OPTIONAL_SECTIONS)
                        + " (default: all; models are always built)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler section")
    parser.add_argument("--no-transformers", action="store_true",
                        help="visorlib rows only (automatic when transformers is not installed)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dict(SMOKE if args.smoke else FULL)
    for key, value in (("budget", args.budget_s), ("max_batch", args.max_batch), ("repeats", args.repeats)):
        if value is not None:
            settings[key] = value
    budget = rows.Budget(settings["budget"], scale=0.1 if args.smoke else 1.0)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    # fp32 checks must be real fp32: TF32 would give both libraries ~1e-3 errors of its own.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"suite": "benchmarks/gpu_suite.py", "smoke": args.smoke, "command": " ".join(sys.argv),
              "settings": {**settings, "dtype": str(dtype).replace("torch.", ""), "text_tokens": args.text_tokens,
                           "configurations": CONFIGURATIONS, "tf32": False},
              "environment": environment(device), "sections": {}, "section_seconds": {}}
    ctx = {"args": args, "settings": settings, "device": device, "dtype": dtype, "budget": budget}

    def save():
        result["elapsed_s"] = budget.elapsed()
        result["targets"] = targets(result)
        out.write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown(result))

    sections = [("build", None, build_section), ("correctness_fp32", 20, correctness_fp32),
                ("convert_dtype", None, convert_dtype), ("correctness_dtype", 20, correctness_dtype),
                ("prefill_7371", 40, lambda c: prefill_section(c, "7371")),
                ("prefill_1485", 30, lambda c: prefill_section(c, "1485")),
                ("decode", 40, decode_section), ("mixed", 15, mixed_section)]
    sections.append(("profile", 15, profile_section))
    chosen = set(OPTIONAL_SECTIONS) if args.sections is None else set(args.sections.split(","))
    if args.no_profile:
        chosen.discard("profile")
    unknown = chosen - set(OPTIONAL_SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(OPTIONAL_SECTIONS)})")
    failed = False
    for name, need, fn in sections:
        if name in OPTIONAL_SECTIONS and name not in chosen:
            result["sections"][name] = "skipped: not selected (--sections)"
        elif need is not None and not budget.allows(need):
            result["sections"][name] = rows.SKIPPED
        else:
            print(f"[{budget.elapsed():6.1f} s] {name} ...", flush=True)
            started = budget.elapsed()
            try:
                value = fn(ctx)
                if value is not None:
                    result["sections"][name] = value
            except Exception as err:  # noqa: BLE001 - one failing section must not lose the others' numbers
                failed = True
                result["sections"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                print(result["sections"][name]["traceback"], file=sys.stderr, flush=True)
            # Seconds each section took: what the next device run's budget is sized from.
            result["section_seconds"][name] = budget.elapsed() - started
            if isinstance(result["sections"].get(name), dict) and "error" in result["sections"][name]:
                rows.free_memory(device, collect=True)  # the failed section's tensors, if any are left
                if name in ("build", "convert_dtype"):
                    save()
                    break
        save()
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out} and {out.with_suffix('.md')} in {budget.elapsed():.0f} s")
    return 1 if failed else 0


def build_section(ctx) -> dict:
    with_hf = transformers_available() and not ctx["args"].no_transformers
    ctx["hf"], ctx["dense"], ctx["visor"] = build_models(ctx["args"].smoke, ctx["device"], with_transformers=with_hf)
    weights = ("random (transformers init), converted by visorlib.models.llava_onevision.convert.convert_llava_onevision_state" if with_hf
               else "random (visorlib init); " + NO_TRANSFORMERS)
    return {"seconds": ctx["budget"].elapsed(), "card": VISOR_CARD + (" (tiny)" if ctx["args"].smoke else ""),
            "parameters": {k: parameter_count(ctx[k]) for k in ("hf", "dense", "visor") if ctx[k] is not None},
            "weights": weights}


if __name__ == "__main__":
    sys.exit(main())
