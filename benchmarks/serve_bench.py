"""Throughput and latency of ``visorlib serve``: continuous batching against one request at a time.

    python benchmarks/serve_bench.py --json benchmarks/results/serve-bench-cpu.json

For each model a real server process is started from the CLI (loopback, a free port) and driven
over HTTP by the official ``openai`` client, streaming, so time to first token is seen as a client
sees it. Three phases send the same requests (``--requests`` prompts, each with one small image,
greedy, ``ignore_eos`` so every answer is exactly ``--max-tokens`` tokens and the phases do equal
work):

* ``sequential`` — one request at a time (the next is sent when the previous has finished);
* ``batched_uniform`` — all at once, every request under the card's default configuration;
* ``batched_mixed`` — all at once, configurations cycling through the plan's and ``"router"``.

Throughput is generated tokens / wall time of the phase; per request the latency (send to last
token) and TTFT (send to the first streamed chunk) are summarised as p50 / p95. The models: the
shipped ``visor-synthdoc-tiny`` and the real-size ``visor-llava-ov-0.5b`` with random weights
(``--random-weights``; its tokenizer from the local Hugging Face cache). Not a timed test: the
numbers depend on the machine and on what else runs on it, which the JSON records.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_image(seed: int, side: int) -> str:
    """A data URL of a ``side`` x ``side`` random-block PNG."""
    import numpy as np
    from PIL import Image

    blocks = np.random.default_rng(seed).integers(0, 256, (max(side // 8, 1), max(side // 8, 1), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blocks).resize((side, side), Image.NEAREST).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(model: str, extra: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """Start a server process (not yet ready: see :func:`wait_ready`)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "visorlib.cli", "serve", model, "--port", str(port), "--threads",
                             str(threads), "--log-level", "warning", *extra], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server not ready in 900 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_request(client, model: str, image: str, question: str, sa_layers, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    usage = None
    parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
        extra_body={"sa_layers": sa_layers, "ignore_eos": True})
    for chunk in stream:
        if first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"latency": end - started, "ttft": first - started, "tokens": usage.completion_tokens,
            "configuration": usage.model_extra["visor"]["configuration"], "start": started, "end": end}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(url: str, model: str, jobs: list[tuple], concurrent: bool, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    started = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda j: one_request(client, model, *j, max_tokens), jobs))
    else:
        results = [one_request(client, model, *j, max_tokens) for j in jobs]
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    latency, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    counts: dict[str, int] = {}
    for r in results:
        counts[r["configuration"]] = counts.get(r["configuration"], 0) + 1
    return {"requests": len(results), "wall_s": round(wall, 3), "generated_tokens": tokens,
            "throughput_tok_s": round(tokens / wall, 2), "requests_per_s": round(len(results) / wall, 3),
            "latency_p50_s": round(percentile(latency, 0.5), 3), "latency_p95_s": round(percentile(latency, 0.95), 3),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3),
            "latency_mean_s": round(statistics.mean(latency), 3), "configurations_ran": counts}


def bench_model(model: str, url: str, args) -> dict:
    """The three phases against a ready server at ``url``."""
    import httpx

    info = httpx.get(url + "/v1/models").json()["data"][0]["visor"]
    configs = [",".join(map(str, c)) or "none" for c in info["configurations"]]
    mixed = configs + (["router"] if info["router"] else [])
    questions = ["What is the title?", "What color is the box?", "Read the number.", "What shape is shown?"]
    images = [small_image(i, args.image_size) if args.image_size else None for i in range(args.requests)]
    base = [(images[i], questions[i % len(questions)]) for i in range(args.requests)]
    # Warm-up: first calls pay one-time costs (allocator, kernels) that no phase should carry.
    run_phase(url, model, [(*base[0], "default")] * 2, True, 4)
    out = {"visor_configurations": mixed}
    out["sequential"] = run_phase(url, model, [(*b, "default") for b in base], False, args.max_tokens)
    out["batched_uniform"] = run_phase(url, model, [(*b, "default") for b in base], True, args.max_tokens)
    out["batched_mixed"] = run_phase(url, model, [(*b, mixed[i % len(mixed)]) for i, b in enumerate(base)], True,
                                     args.max_tokens)
    seq, uni, mix = (out[k]["throughput_tok_s"] for k in ("sequential", "batched_uniform", "batched_mixed"))
    out["speedup_batched_uniform_vs_sequential"] = round(uni / seq, 2)
    out["speedup_batched_mixed_vs_sequential"] = round(mix / seq, 2)
    out["mixed_vs_uniform_throughput"] = round(mix / uni, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve-bench-cpu.json"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="side of the square test images (pixels)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (shared machine: 1)")
    parser.add_argument("--large-requests", type=int, default=16, help="requests for visor-llava-ov-0.5b")
    parser.add_argument("--large-max-tokens", type=int, default=8)
    parser.add_argument("--large-image-size", type=int, default=0,
                        help="image side for visor-llava-ov-0.5b; 0: text-only prompts. Any image is at least two "
                             "384-px tiles (1485 visual tokens), ~20 s of prefill per request on this CPU unloaded")
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model")
    args = parser.parse_args()
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average_at_start": os.getloadavg(), "server_threads": args.threads,
                           "note": "shared 2-core CPU; two training runs and other sessions' jobs were running"},
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": {"requests": args.requests, "max_tokens": args.max_tokens, "image_size": args.image_size,
                            "greedy": True, "ignore_eos": True, "client": "openai (streaming, one thread per request)"},
               "models": {}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench_"))  # server logs, the 0.5B tokenizer
    print(f"server logs in {log_dir}", flush=True)
    tiny_flags = ["--max-batch", "32"]
    servers = {"visor-synthdoc-tiny": start_server("visor-synthdoc-tiny", tiny_flags, args.threads,
                                                   log_dir / "tiny.log")}
    if not args.skip_large:
        from visorlib import zoo
        from visorlib.train.synth import make_synthetic_dataset

        # No Hub access here: a word-level tokenizer with the card's special-token ids (what
        # `visorlib data synth --model visor-llava-ov-0.5b` writes); speed does not depend on it.
        words = log_dir / "tokenizer"
        make_synthetic_dataset(words, zoo.get_config("visor-llava-ov-0.5b"), samples=1)
        large_flags = ["--random-weights", "--max-batch", "32", "--tokenizer", str(words)]
        # Both start at once: on a loaded machine most of a start is waiting for CPU time.
        servers["visor-llava-ov-0.5b"] = start_server("visor-llava-ov-0.5b", large_flags, args.threads,
                                                      log_dir / "large.log")
    try:
        for name, (proc, url) in servers.items():
            wait_ready(proc, url, log_dir / ("tiny.log" if name == "visor-synthdoc-tiny" else "large.log"))
        print(f"servers ready at {time.strftime('%H:%M:%S')}", flush=True)
        proc, url = servers["visor-synthdoc-tiny"]
        results["models"]["visor-synthdoc-tiny"] = {"server_flags": tiny_flags, **bench_model(
            "visor-synthdoc-tiny", url, args)}
        stop_server(proc)
        print(json.dumps(results["models"]["visor-synthdoc-tiny"], indent=1), flush=True)
        if not args.skip_large:
            large = argparse.Namespace(**{**vars(args), "requests": args.large_requests,
                                          "max_tokens": args.large_max_tokens, "image_size": args.large_image_size})
            proc, url = servers["visor-llava-ov-0.5b"]
            results["models"]["visor-llava-ov-0.5b"] = {
                "weights": "random (real-size architecture)", "tokenizer": "synthetic word-level (card's special ids)",
                "requests": large.requests, "max_tokens": large.max_tokens, "image_size": large.image_size,
                "server_flags": large_flags, **bench_model("visor-llava-ov-0.5b", url, large)}
            print(json.dumps(results["models"]["visor-llava-ov-0.5b"], indent=1), flush=True)
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                stop_server(proc)
    results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
