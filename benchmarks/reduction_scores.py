"""Cost of token-reduction scoring next to the attention it rides along (issue 12, phase 1).

Compares, at real sizes with random tensors: the materialised "attention received" of a tower
layer against the blocked column mean of :func:`visorlib.visor.reduction.received_attention` (several
chunk sizes), and the last-token decoder scores of :func:`visorlib.visor.reduction.query_attention`,
each next to one SDPA attention of the same layer. Run it under the shared benchmark lock::

    flock /tmp/visorlib-bench.lock python benchmarks/reduction_scores.py --json benchmarks/results/reduction-scores-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from visorlib.visor.reduction import query_attention, received_attention


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=10, help="tiles in the tower batch (1000x1000 image: 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    n, h, t, d = args.tiles, 16, 729, 72                     # SigLIP-so400m/14 at 384 px
    q, k, v = (torch.randn(n, h, t, d) for _ in range(3))
    rows.append(("tower layer SDPA attention", timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats), 0))

    def materialised():
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1).mean(1)

    reference = materialised()
    rows.append(("received attention, materialised", timed(materialised, args.repeats), n * h * t * t * 4))
    for chunk in (32, 64, 256):
        err = (received_attention(q, k, chunk=chunk) - reference).abs().max().item()
        seconds = timed(lambda chunk=chunk: received_attention(q, k, chunk=chunk), args.repeats)
        rows.append((f"received attention, blocked chunk {chunk} (max err {err:.1e})", seconds, n * h * chunk * t * 4))

    hq, hkv, length, dd = 14, 2, 7371 + 60, 64              # Qwen2-0.5B, 7371 visual + 60 text tokens
    qq, kk, vv = torch.randn(1, hq, 1, dd), torch.randn(1, hkv, length, dd), torch.randn(1, hkv, length, dd)
    valid, vis = torch.ones(1, length, dtype=torch.bool), torch.arange(20, 20 + 7371)[None]
    rows.append(("last-token scores vs all keys", timed(lambda: query_attention(
        qq, kk, torch.tensor([[length - 1]]), valid, vis, torch.ones_like(vis, dtype=torch.bool)), args.repeats), 0))
    qf = torch.randn(1, hq, length, dd)
    rows.append(("decoder layer causal SDPA prefill", timed(lambda: F.scaled_dot_product_attention(
        qf, kk, vv, is_causal=True, enable_gqa=True), 1), 0))

    print(f"| ({n} tiles x {h} heads x {t} x {d}; decoder {length} tokens) | ms | extra MiB |\n|---|---|---|")
    for name, seconds, extra in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {extra / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": platform.processor() or platform.machine(), "threads": args.threads,
                       "torch": torch.__version__, "dtype": "float32",
                       "rows": [{"what": a, "ms": s * 1e3, "extra_mib": e / 2**20} for a, s, e in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
