"""VISOR benchmark: decode latency, KV-cache bytes and the per-sample batching strategy.

Real 0.5B dimensions with random weights (speed does not depend on the weights' values). Prefill
latency per configuration comes from ``visorlib profile`` (see README.md); this script adds:

* decode: milliseconds per decode step after a prefill (prefill not timed), dense vs configurations;
* KV cache: bytes actually held per sample after the prefill (``KVCache.nbytes_per_sample``);
* per-sample configurations: a batch whose samples run different configurations, executed by
  gathering the executing samples per layer (visorlib's executor) vs splitting the batch into
  one sub-batch per configuration ("group"); language model only.

Usage::

    python benchmarks/visor_bench.py --json benchmarks/results/visor-bench-cpu.json            # CPU
    python benchmarks/visor_bench.py --device cuda --dtype bfloat16 --image-size 1000 --json ...   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import visorlib
from visorlib.models.llava_onevision import LlavaOnevisionProcessor
from visorlib.processing import anyres
from visorlib.profiling import best_time
from visorlib.visor import Embedded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(model, image_size, n_text, batch, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    n_visual = LlavaOnevisionProcessor(cfg).num_image_tokens(image_size)
    tiles = anyres.num_tiles(image_size, cfg.processing.pinpoints(cfg.vision.image_size), cfg.vision.image_size)
    row = torch.cat([torch.randint(0, 1000, (n_text // 2,), generator=g), torch.full((n_visual,), cfg.tokens.image_token_id),
                     torch.randint(0, 1000, (n_text - n_text // 2,), generator=g)])
    side = cfg.vision.image_size
    return dict(
        input_ids=row.expand(batch, -1).clone().to(device),
        attention_mask=torch.ones(batch, len(row), dtype=torch.long, device=device),
        pixel_values=torch.randn(batch, tiles, 3, side, side, generator=g).to(device, dtype),
        image_sizes=torch.tensor([image_size] * batch, device=device),
    ), n_visual


@torch.inference_mode()
def decode_ms_per_token(model, inputs, sa_layers, steps, device, repeats=2):
    """Milliseconds per decode step after a prefill (the prefill itself is not timed)."""
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache()
        out = model(**inputs, cache=cache, sa_layers=sa_layers, logits_to_keep=1)
        mask = inputs["attention_mask"]
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            step = model(step, mask, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return 1000 * best


def cache_bytes(model, inputs, sa_layers):
    cache = model.new_cache()
    with torch.inference_mode():
        model(**inputs, cache=cache, sa_layers=sa_layers, logits_to_keep=1)
    return cache.nbytes_per_sample()[0]


@torch.inference_mode()
def language_model_forward(model, parts, rows, configs):
    """Decoder + last-position logits for ``rows`` of pre-embedded inputs (vision excluded).

    ``parts``: ``(embeds, positions, attention_mask, visual_mask, segments, input_ids)``.
    """
    embeds, positions, mask, visual, segments, ids = (t[rows] for t in parts)
    out = model.language_model(ids, Embedded(embeds, visual, segments), mask, positions, logits_to_keep=1,
                               sa_layers=configs)
    return out.logits


def grouped_forward(model, parts, configs):
    """The alternative strategy: one pass per distinct configuration, results put back in order."""
    out = None
    for config in {tuple(c) for c in configs}:
        rows = [i for i, c in enumerate(configs) if tuple(c) == config]
        logits = language_model_forward(model, parts, rows, list(config))
        if out is None:
            out = logits.new_empty(len(configs), *logits.shape[1:])
        out[rows] = logits
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="visor-llava-ov-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--image-size", type=int, default=384, help="square image side (384 -> 1485 tokens)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    parser.add_argument("--mixed-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = visorlib.build(args.model, device=device, dtype=dtype)
    size = (args.image_size, args.image_size)
    inputs, n_visual = make_inputs(model, size, args.text_tokens, 1, device, dtype)
    plan = model.plan
    configs = sorted(plan.configurations, key=len)
    rows = {"dense-equivalent (all SA, CA still on)": "all", plan.describe(configs[0]): configs[0],
            plan.describe(configs[-1]): configs[-1]}
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "dtype": args.dtype, "visual_tokens": n_visual,
              "text_tokens": args.text_tokens, "decode": {}, "kv_cache_bytes_per_sample": {}}
    dense = visorlib.zoo.instantiate(visorlib.get_config(args.model.replace("visor-", "")), device, dtype).eval()
    result["decode_ms_per_token"] = result.pop("decode")
    result["decode_ms_per_token"]["dense model"] = decode_ms_per_token(dense, inputs, None, args.new_tokens, device)
    result["kv_cache_bytes_per_sample"]["dense model"] = cache_bytes(dense, inputs, None)
    del dense
    for label, config in rows.items():
        print(f"decode {label} ...", flush=True)
        result["decode_ms_per_token"][label] = decode_ms_per_token(model, inputs, config, args.new_tokens, device)
        result["kv_cache_bytes_per_sample"][label] = cache_bytes(model, inputs, config)
    # Per-sample configurations in one batch: gather-per-layer vs group-by-configuration, timing
    # the language model only (the vision tower's cost is the same for both strategies).
    batch_inputs, _ = make_inputs(model, size, args.text_tokens, args.mixed_batch, device, dtype, seed=1)
    mixed = [configs[0] if i % 2 == 0 else configs[-1] for i in range(args.mixed_batch)]
    print("mixed batch ...", flush=True)
    with torch.inference_mode():
        ids = batch_inputs["input_ids"]
        embeds, visual, segments = model.embed(ids, batch_inputs["pixel_values"], batch_inputs["image_sizes"])
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    parts = (embeds, positions, batch_inputs["attention_mask"], visual, segments, ids)
    every = list(range(args.mixed_batch))
    gather = best_time(lambda: language_model_forward(model, parts, every, mixed), args.repeats, device)
    group = best_time(lambda: grouped_forward(model, parts, mixed), args.repeats, device)
    a = language_model_forward(model, parts, every, mixed)
    b = grouped_forward(model, parts, mixed)
    result["mixed_batch"] = {"batch": args.mixed_batch, "configurations": [plan.describe(c) for c in mixed],
                             "gather_per_layer_llm_seconds": gather, "group_by_configuration_llm_seconds": group,
                             "max_abs_logit_difference": float((a - b).abs().max())}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - start:.0f} s")
