"""Start-up time: ``import visorlib``, ``visorlib --help``, and the first use of the model code.

Each case runs in a fresh interpreter (``python -c ...`` from the repository root), ``--repeats``
times; the median and the spread are reported with the machine's load average, since on a small
shared machine the numbers move with whatever else runs (issue 17 measured 6.5 s for both on an
idle 2-core machine; the targets are ``import visorlib`` <= 2 s and ``visorlib --help`` <= 1.5 s).
``import torch`` is measured too: it bounds what any command that builds a model can reach.
With ``--importtime`` the heaviest modules of ``python -X importtime`` are listed per case.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/startup_bench.py --repeats 5 \\
        --json benchmarks/results/startup-cpu.json --importtime
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "import visorlib": "import visorlib",
    "visorlib --help": ("import sys, contextlib, io\nimport visorlib.cli as c\n"
                        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
                        "    c.main(['--help'])"),
    "import torch": "import torch",
    "visorlib.get_config (zoo + models, no timm)": "import visorlib; visorlib.get_config('visor-llava-ov-0.5b')",
}


def run(code: str, extra: tuple[str, ...] = (), repo: Path = REPO) -> tuple[float, str]:
    """Wall seconds of a fresh ``python -c code`` (imports included) against ``repo``, and its stderr."""
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *extra, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{code!r} failed: {done.stderr[-500:]}")
    return seconds, done.stderr


def heaviest(importtime: str, top: int = 8) -> list[tuple[str, float]]:
    """``(module, cumulative seconds)`` of the top-level imports that cost most."""
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and name.startswith(" ") and not name.startswith("   "):
            rows.append((name.strip(), int(cumulative) / 1e6))  # two-space indent at most: top level
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--importtime", action="store_true", help="also attribute each case with -X importtime")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to measure (default: this one), e.g. "
                        "an older commit's worktree for a before/after comparison")
    args = parser.parse_args()
    results = {"repo": str(args.repo), "python": sys.version.split()[0], "cpus": os.cpu_count(),
               "repeats": args.repeats, "cases": {}}
    load_before = os.getloadavg()
    for label, code in CASES.items():
        times = [run(code, repo=args.repo)[0] for _ in range(args.repeats)]
        row = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
               "max_s": round(max(times), 3)}
        if args.importtime:
            row["importtime_top_s"] = [(name, round(s, 3)) for name, s in heaviest(run(code, ("-X", "importtime"), args.repo)[1])]
        results["cases"][label] = row
        print(f"{label:48s} median {row['median_s']:6.2f} s  (min {row['min_s']:.2f}, max {row['max_s']:.2f})",
              flush=True)
    results["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(f"load average (1 min) before / after: {results['load_average_1m_before_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
