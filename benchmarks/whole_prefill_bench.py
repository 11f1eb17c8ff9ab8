"""The whole forward path next to its parts: visorlib vs transformers, same random real-size weights.

Issue 20 measured each part at parity (vision tower, language model) while the whole prefill was
slower; this script times the *whole* model — prefill (``logits_to_keep=1``) and one decode step —
for the dense ``llava-ov-0.5b`` in visorlib and in transformers' LLaVA-OneVision, both fp32, with
the weights transformers initialised mapped by visorlib's own converter (``gpu_suite_models``),
on one 384 px image (1485 visual tokens) and 64 text tokens. Rows run interleaved (round-robin),
so drift from other load on the machine hits both; the JSON keeps every round, the median and the
spread. Run it once, at the end of a change, with few repeats (a prefill takes ~20 s on one CPU
thread)::

    OMP_NUM_THREADS=1 python benchmarks/whole_prefill_bench.py --threads 1 --repeats 3 \\
        --out benchmarks/results/whole-prefill-cpu.json

``--profile-rounds N`` adds where the time goes: N more prefills of each model under
``torch.profiler``, every aten op keyed by its name and input shapes, the ops whose summed self
time differs most between the two libraries first (the glue between the parts — embedding merge,
anyres unpadding, masks, copies — shows up there as ops one side runs and the other does not).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite_models as suite  # noqa: E402 - the benchmark folder is not a package
from gpu_suite_rows import TransformersRow, VisorlibRow  # noqa: E402


def rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Every function once untimed (allocator growth, kernel choice), then ``repeats`` timed rounds, interleaved."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[label].append(time.perf_counter() - start)
    return out


def add_op_times(fn, totals: dict[tuple[str, str], list[float]]) -> None:
    """Profile one call of ``fn``; add each aten op's self CPU seconds and calls (by name and input shapes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    for event in prof.key_averages(group_by_input_shape=True):
        seconds, calls = totals.get((event.key, str(event.input_shapes)), (0.0, 0))
        totals[(event.key, str(event.input_shapes))] = [seconds + event.self_cpu_time_total / 1e6, calls + event.count]


def op_differences(fns: dict, rounds: int, top: int = 25) -> list[dict]:
    """The ``top`` ops whose summed self time differs most between the rows (profiles interleaved)."""
    totals: dict[str, dict] = {label: {} for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            add_op_times(fn, totals[label])
    ours, theirs = totals["visorlib"], totals["transformers"]
    none = (0.0, 0)
    keys = sorted(set(ours) | set(theirs), key=lambda k: -abs(ours.get(k, none)[0] - theirs.get(k, none)[0]))
    return [{"op": k[0], "input_shapes": k[1],
             "visorlib_s": round(ours.get(k, none)[0], 4), "visorlib_calls": ours.get(k, none)[1],
             "transformers_s": round(theirs.get(k, none)[0], 4), "transformers_calls": theirs.get(k, none)[1]}
            for k in keys[:top]]


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "rounds_s": times}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny card (checks the script, times nothing real)")
    parser.add_argument("--profile-rounds", type=int, default=0,
                        help="profile this many more prefills per model and report the ops that differ most")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    hf, dense, _ = suite.build_models(args.smoke, device)
    side = suite.image_side(dense.cfg, "1485")
    inputs = suite.make_inputs(dense.cfg, side, args.text_tokens, 1, device, torch.float32)
    ours, theirs = VisorlibRow("visorlib", dense), TransformersRow("transformers", hf)
    with torch.inference_mode():
        agreement = suite.logit_agreement(ours.end_to_end(inputs), theirs.end_to_end(inputs))
        token = inputs["input_ids"][:, -1:]
        whole = {"visorlib": lambda: ours.end_to_end(inputs), "transformers": lambda: theirs.end_to_end(inputs)}
        prefill = rounds(whole, args.repeats)
        profiled = op_differences(whole, args.profile_rounds) if args.profile_rounds else None
        states = {"visorlib": ours.prefill(inputs)[0], "transformers": theirs.prefill(inputs)[0]}
        # Each step extends its own cache and mask by one token (decode per token at a growing length).
        decode = rounds({"visorlib": lambda: ours.step(states["visorlib"], token),
                         "transformers": lambda: theirs.step(states["transformers"], token)}, args.repeats)
    result = {
        "model": dense.cfg.name, "dtype": "float32", "threads": args.threads, "repeats": args.repeats,
        "visual_tokens": int((inputs["input_ids"] == dense.cfg.tokens.image_token_id).sum()),
        "text_tokens": args.text_tokens, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "last_logits_agreement": agreement,
        "prefill": {k: summary(v) for k, v in prefill.items()},
        "decode_step": {k: summary(v) for k, v in decode.items()},
    }
    if profiled is not None:
        result["op_differences"] = {"profile_rounds": args.profile_rounds, "ops": profiled}
    result["prefill_speed_vs_transformers"] = (result["prefill"]["transformers"]["median_s"]
                                               / result["prefill"]["visorlib"]["median_s"])
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
