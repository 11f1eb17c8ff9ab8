"""Time and peak memory of ``visorlib analyze`` on the real-size random LLaVA-OV 0.5B (issue 19).

The architecture of ``llava-ov-0.5b`` with random weights (no download) analyses a few synthetic
pages of 384 x 384 pixels: one base tile + one 27 x 27 tile with its row newlines = **1485 visual
tokens** per sample, the paper's single-tile case. Reported:

* ``plain_forward_s`` — one teacher-forced forward of one sample without the probe (SDPA);
* ``observed_forward_s`` — the same forward with the attention probe and the visual states kept
  (:func:`visorlib.analysis.measure_batch`), and ``cka_s`` — that sample's 25 x 25 CKA matrix:
  the probe's overhead is the difference to the plain forward;
* ``analyze_s`` — the whole :func:`visorlib.analysis.analyze` over ``--samples`` samples with
  ``--drop-subsets`` layer-drop subsets (greedy answers of ``--max-new-tokens`` tokens);
* ``cpu_s`` — the same in process CPU seconds, which other jobs on a shared machine distort less
  than wall-clock time;
* peak memory: process peak RSS on CPU (weights included; the RSS after building the model is
  reported beside it), ``torch.cuda.max_memory_allocated`` on a GPU.

Run it under the shared benchmark lock, few samples (a CPU forward at this size takes tens of
seconds)::

    flock /tmp/visorlib-bench.lock python benchmarks/analyze_bench.py --json benchmarks/results/analyze-bench-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

import visorlib
from visorlib.analysis import analyze, answer_positions, cka_matrix, load_samples, measure_batch
from visorlib.analysis.run import teacher_forced
from visorlib.data.conversations import collate
from visorlib.train import make_synthetic_dataset


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-ov-0.5b")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--drop-subsets", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tiny", action="store_true", help="the card's tiny variant (a smoke test of the script)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.tiny:
        model = visorlib.zoo.instantiate(visorlib.get_config(args.model).tiny()).to(device).eval()
    else:
        model = visorlib.build(args.model, device=device, dtype=getattr(torch, args.dtype)).eval()
    build_s = time.perf_counter() - started
    rss_model = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "synth", model.cfg, samples=args.samples, image_size=384)
        processor = visorlib.processor_for(model, Path(tmp) / "synth" / "tokenizer.json")
        samples = load_samples([str(data)], limit=args.samples)

        batch = collate([teacher_forced(processor, samples[0])], processor.tokenizer.pad_token_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        visual = int(model.language_model.visual_token_mask(batch["input_ids"]).sum())
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.inference_mode():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            model(**inputs, logits_to_keep=1, token_reduction=[])
            sync(device)
            plain, plain_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            probe = measure_batch(model, batch, answer_positions(batch["labels"]), chunk=args.chunk, keep_states=True)
            sync(device)
            observed, observed_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            cka = cka_matrix(torch.stack([s[0] for s in probe.states]))
            sync(device)
            cka_s, cka_cpu = time.perf_counter() - t0, time.process_time() - c0
        del probe
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        report = analyze(model, processor, samples, batch_size=args.batch_size, chunk=args.chunk,
                         drop_subsets=args.drop_subsets, max_new_tokens=args.max_new_tokens, suggest=True,
                         progress=False)
        sync(device)
        analyze_s, analyze_cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "benchmark": "visorlib analyze, real-size random model (issue 19)",
        "model": args.model + (" (tiny)" if args.tiny else ""),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "visual_tokens": visual,
        "sequence_tokens": int(batch["input_ids"].shape[1]),
        "settings": {"samples": args.samples, "drop_subsets": args.drop_subsets, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "chunk": args.chunk},
        "build_s": round(build_s, 2),
        "plain_forward_s": round(plain, 2),
        "observed_forward_s": round(observed, 2),
        "probe_overhead": round(observed / plain - 1, 3),
        "cpu_s": {"plain_forward": round(plain_cpu, 2), "observed_forward": round(observed_cpu, 2),
                  "cka": round(cka_cpu, 2), "analyze": round(analyze_cpu, 1)},
        "probe_overhead_cpu": round(observed_cpu / plain_cpu - 1, 3),
        "cka_s": round(cka_s, 2),
        "cka_min": round(float(cka.min()), 4),
        "analyze_s": round(analyze_s, 1),
        "analyze_s_per_sample": round(analyze_s / args.samples, 1),
        "peak_rss_mib": round(peak_rss_mib()),
        "rss_after_model_build_mib": round(rss_model),
        "suggested_plan": report["suggested_plan"]["visor"],
        "note": "random weights: the numbers are cost, not the measurements' values",
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
