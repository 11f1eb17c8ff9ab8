"""Evaluation throughput: batch 1 vs batches that mix configurations, on the same samples.

A tiny random ``visor-llava-ov-0.5b`` (test size: hidden 64, 24 layers, 30-px tiles) answers the
synthetic task's questions under several fixed configurations; once one prompt at a time, once
``--batch-size`` prompts per batch with a different configuration for each sample (one
``sa_layers`` list per sample). The answers must be identical; the script checks that and reports
samples/s of each run (samples = sample x configuration pairs).

Usage::

    flock /tmp/visorlib-bench.lock python benchmarks/eval_bench.py --json benchmarks/results/eval-bench-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import visorlib
from visorlib.eval import evaluate
from visorlib.train import make_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8, help="synthetic pages (3 questions each)")
    parser.add_argument("--configs", default="1,4;1,4,7;1,4,7,10,16;1,4,7,10,16,19,22")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = visorlib.get_config("visor-llava-ov-0.5b").tiny()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = make_synthetic_dataset(folder / "synth", cfg, samples=args.samples, image_size=60)
        torch.manual_seed(0)
        model = visorlib.zoo.instantiate(cfg).eval()
        model.save_pretrained(folder / "ckpt")
        shutil.copy(folder / "synth" / "tokenizer.json", folder / "ckpt" / "tokenizer.json")
        model = visorlib.from_pretrained(folder / "ckpt")
        processor = visorlib.processor_for(model)
        runs = {}
        for name, batch, mix in (("batch 1", 1, False), (f"batch {args.batch_size}, mixed", args.batch_size, True)):
            path = folder / f"{batch}.jsonl"
            started = time.perf_counter()
            evaluate(model, str(data), configs=args.configs, batch_size=batch, mix_configs=mix, predictions=path,
                     max_new_tokens=args.max_new_tokens, processor=processor, progress=False)
            seconds = time.perf_counter() - started
            records = [json.loads(line) for line in path.read_text().splitlines()]
            runs[name] = {"seconds": round(seconds, 2), "pairs": len(records),
                          "samples_per_s": round(len(records) / seconds, 2),
                          "answers": {(r["sample"], r["configuration"]): r["prediction"] for r in records}}
    first, second = runs.values()
    identical = first["answers"] == second["answers"]
    result = {"model": "visor-llava-ov-0.5b (tiny, random weights)", "device": "cpu", "threads": args.threads,
              "questions": args.samples * 3, "configurations": args.configs.split(";"),
              "max_new_tokens": args.max_new_tokens, "identical_answers": identical,
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in runs.items()}}
    result["speedup"] = round(second["samples_per_s"] / first["samples_per_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not identical:
        raise SystemExit("batched answers differ from one-by-one answers")


if __name__ == "__main__":
    main()
