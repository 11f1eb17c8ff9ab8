"""The synthdoc reproduction: the whole paper pipeline at tiny scale, from scratch, on a CPU.

Runs the recipes of ``recipes/synthdoc-*.yaml`` in order (reading drill -> dense -> VISOR stage 1 -> stage 2
universal -> two independent baselines -> router), each through the same ``Trainer`` that
``visorlib train`` uses, with every path redirected into ``--work``; then scores every model on
held-out pages of a seed no recipe trains on (``visorlib.demo.HELD_OUT_SEED``) and writes one JSON
of accuracy per question kind vs language-model FLOPs, the router's choices, the training curves
and the wall-clock time of every stage::

    OMP_NUM_THREADS=1 python benchmarks/synthdoc_repro.py --work /tmp/synthdoc \\
        --json benchmarks/results/synthdoc-repro.json [--ship]

``--ship`` copies the trained dense and router-stage models (with tokenizer, recipes and logs)
into ``zoo/weights/`` so ``visorlib.build("visor-synthdoc-tiny", pretrained=True)`` loads them.
``--scale 0.1`` shrinks every stage's steps (a quick check of the chain, not a result).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visorlib import zoo  # noqa: E402
from visorlib.demo import HELD_OUT_SEED, evaluate  # noqa: E402
from visorlib.eval.held_out import held_out_task_accuracy  # noqa: E402
from visorlib.train import Trainer, load_recipe  # noqa: E402
from visorlib.train.router import run_router_stage  # noqa: E402
from visorlib.train.synthdoc import make_synthdoc_dataset  # noqa: E402

RECIPES = ROOT / "recipes"
# (stage name, recipe, the stage whose exported model it starts from)
CHAIN = [("read", "synthdoc-read", None), ("dense", "synthdoc-dense", "read"), ("stage1", "synthdoc-stage1", "dense"),
         ("stage2", "synthdoc-stage2", "stage1"), ("independent-1", "synthdoc-independent-1", "stage1"),
         ("independent-full", "synthdoc-independent-full", "stage1"), ("router", "synthdoc-router", "stage2")]


def exported(work: Path, stage: str) -> Path:
    """The loadable ``model/`` folder a stage left in its run folder."""
    if stage == "router":
        return work / stage / "model"
    run = work / stage
    return run / (run / "latest").read_text().strip() / "model"


def run_stage(work: Path, stage: str, recipe_name: str, parent: str | None, scale: float, seed_offset: int = 0,
              steps: int | None = None) -> dict:
    """Train one recipe with its paths moved into ``work``; returns its timing and curve.

    ``steps`` replaces the recipe's ``training.max_steps`` (before ``scale``).
    """
    base = load_recipe(RECIPES / f"{recipe_name}.yaml")
    data = work / ("router-data" if stage == "router" else "data")
    sets = [f"checkpoint.dir={work / stage}", f"data.tokenizer={data}",
            f"training.seed={base.training.seed + seed_offset}"]
    if stage == "router":
        sets.append(f"data.datasets=[{', '.join(f'{{path: {data / k}.jsonl, name: {k}}}' for k in ('easy', 'hard', 'pair'))}]")
        sets.append(f"router.labels_file={work / stage / 'configuration-log.jsonl'}")
        sets.append(f"router.steps={max(2, int(base.router.steps * scale))}")
        sets.append(f"router.samples_per_dataset={max(2, int(base.router.samples_per_dataset * scale))}")
    else:
        steps = max(2, int((steps or base.training.max_steps) * scale))
        source = data / "drill.jsonl" if stage == "read" else data
        sets += [f"data.datasets=[{{path: {source}, format: synthetic}}]", f"training.max_steps={steps}",
                 f"checkpoint.every_steps={steps}", f"logging.metrics_file={work / stage / 'metrics.jsonl'}",
                 "logging.progress=false"]
    if parent is not None:
        sets.append(f"model.pretrained={exported(work, parent)}")
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml", sets)
    shutil.rmtree(work / stage, ignore_errors=True)
    started = time.perf_counter()
    trainer = Trainer(recipe)
    out: dict = {"recipe": f"recipes/{recipe_name}.yaml", "overrides": sets}
    if stage == "router":
        out["router_report"] = run_router_stage(recipe, trainer, held_out_task_accuracy)
    else:
        logs = trainer.train()
        out["steps"] = len(logs)
        out["curve"] = [{"step": m["step"], "loss": round(m["loss"], 4)} for m in logs[:: max(1, len(logs) // 40)]]
        out["final_loss"] = logs[-1]["loss"]
    out["seconds"] = time.perf_counter() - started
    print(f"[{stage}] {out['seconds']:.0f} s", {k: v for k, v in out.items() if k in ("final_loss", "router_report")},
          flush=True)
    return out


def score(folder: Path, pages: int, only=None, render=None) -> list[dict]:
    """Held-out rows of :func:`visorlib.demo.evaluate` for the model in ``folder``."""
    model = zoo.from_pretrained(folder)
    processor = zoo.processor_for(model)
    rows = evaluate(model, processor, HELD_OUT_SEED, pages, render)
    return [r for r in rows if only is None or r["sa_layers"] == only]


def ship(work: Path) -> None:
    """Copy the dense and the final VISOR model, with recipes and logs, into ``zoo/weights/``."""
    for name, stage in (("synthdoc-tiny", "dense"), ("visor-synthdoc-tiny", "router")):
        target = ROOT / "zoo" / "weights" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(exported(work, stage), target)
        (target / "recipes").mkdir()
        stages = ["read", "dense"] if stage == "dense" else ["read", "dense", "stage1", "stage2", "router"]
        for part in stages:
            recipe = dict(CHAIN_BY_STAGE)[part]
            shutil.copy(RECIPES / f"{recipe}.yaml", target / "recipes")
            for log in ("metrics.jsonl", "router-report.json"):
                if (work / part / log).exists():
                    shutil.copy(work / part / log, target / "recipes" / f"{part}-{log}")
        print(f"shipped {target}")


CHAIN_BY_STAGE = [(stage, recipe) for stage, recipe, _ in CHAIN]


def markdown(result: dict) -> str:
    """The accuracy-vs-FLOPs table of a result JSON, as Markdown (for docs/synthdoc.md)."""
    names = {"dense": "dense (synthdoc-tiny)", "stage1": "VISOR after stage 1", "universal": "VISOR universal",
             "independent-1": "independent [1]", "independent-full": "independent [1,3,5,6]"}
    lines = ["| model | configuration | easy | hard | pair | all | LLM MFLOPs / sample |",
             "|---|---|---|---|---|---|---|"]
    for key in ("dense", "stage1", "universal", "independent-1", "independent-full"):
        for row in result["evaluation"].get(key, []):
            acc = row["accuracy"]
            lines.append(f"| {names[key]} | {row['label']} | {acc['easy']:.3f} | {acc['hard']:.3f} | {acc['pair']:.3f} "
                         f"| {acc['all']:.3f} | {row['gflops_per_sample'] * 1e3:.2f} |")
    return "\n".join(lines + ["", *claims(result)])


def claims(result: dict) -> list[str]:
    """The paper's claims (and the issue's targets) checked against a result, one line each."""
    ev = result["evaluation"]
    dense = ev["dense"][0]["accuracy"]
    uni = {r["label"]: r for r in ev["universal"]}
    full, ca, router = uni["SA 1,3,5,6"], uni["CA-only []"], uni["router"]
    ind1, indf = ev["independent-1"][0], ev["independent-full"][0]

    def pts(a: float, b: float) -> str:
        return f"{100 * (a - b):+.1f} points"

    mix = lambda r: r["accuracy"]["all"]  # noqa: E731 - easy+hard+pair mix of the held-out pages
    return [
        f"- dense target (>= 0.95 easy, >= 0.85 hard): easy {dense['easy']:.3f}, hard {dense['hard']:.3f}, "
        f"pair {dense['pair']:.3f}",
        f"- VISOR full within 3 points of dense: easy {pts(full['accuracy']['easy'], dense['easy'])}, "
        f"hard {pts(full['accuracy']['hard'], dense['hard'])}",
        f"- CA-only trails on hard questions: CA-only hard {ca['accuracy']['hard']:.3f} / pair "
        f"{ca['accuracy']['pair']:.3f} vs full {full['accuracy']['hard']:.3f} / {full['accuracy']['pair']:.3f}; "
        f"easy {ca['accuracy']['easy']:.3f} vs {full['accuracy']['easy']:.3f}",
        f"- universal vs independent: [1] {mix(uni['SA 1']):.3f} vs {mix(ind1):.3f}; [1,3,5,6] {mix(full):.3f} vs "
        f"{mix(indf):.3f} (all questions)",
        f"- router: {mix(router):.3f} vs full {mix(full):.3f} ({100 * mix(router) / max(mix(full), 1e-9):.1f} % of it) "
        f"at {full['gflops_per_sample'] / router['gflops_per_sample']:.2f}x fewer LLM FLOPs; choices "
        f"{router['choices']}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/synthdoc-repro", help="run folder (data, checkpoints)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "synthdoc-repro.json"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick check)")
    parser.add_argument("--pages", type=int, default=100, help="held-out pages scored per model")
    parser.add_argument("--skip-training", action="store_true", help="only score the models already in --work")
    parser.add_argument("--start-at", choices=[stage for stage, _, _ in CHAIN], default="read",
                        help="reuse the data and the earlier stages already in --work")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="add this to every stage's training.seed (a second training seed of the same chain)")
    parser.add_argument("--ship", action="store_true", help="copy the trained models into zoo/weights/")
    parser.add_argument("--markdown", help="only print the table of this result JSON as Markdown")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    started = time.perf_counter()
    result: dict = {"machine": "shared 2-core CPU (other jobs running; timings are upper bounds)",
                    "threads": 1, "held_out_seed": HELD_OUT_SEED, "held_out_pages": args.pages,
                    "scale": args.scale, "seed_offset": args.seed_offset, "stages": {}}
    if not args.skip_training:
        cfg = zoo.get_config("visor-synthdoc-tiny")
        t = time.perf_counter()
        if args.start_at == "read":
            make_synthdoc_dataset(work / "data", cfg, 4000, seed=1, eval_pages=0, drill_rows=200)
            make_synthdoc_dataset(work / "router-data", cfg, 150, seed=2)
        result["data_seconds"] = time.perf_counter() - t
        stages = [stage for stage, _, _ in CHAIN]
        for stage, recipe, parent in CHAIN[stages.index(args.start_at):]:
            result["stages"][stage] = run_stage(work, stage, recipe, parent, args.scale, args.seed_offset)
        result["train_seconds"] = time.perf_counter() - started
    evaluation = {"dense": score(exported(work, "dense"), args.pages),
                  "universal": score(exported(work, "router"), args.pages),
                  "independent-1": score(exported(work, "independent-1"), args.pages, [1]),
                  "independent-full": score(exported(work, "independent-full"), args.pages, [1, 3, 5, 6]),
                  "stage1": score(exported(work, "stage1"), args.pages)}
    result["evaluation"] = evaluation
    result["total_seconds"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for name, rows in evaluation.items():
        for row in rows:
            acc = row["accuracy"]
            print(f"{name:18s} {row['label']:14s} easy {acc['easy']:.2f} hard {acc['hard']:.2f} pair {acc['pair']:.2f} "
                  f"LLM {row['gflops_per_sample'] * 1e3:.2f} MFLOPs {row.get('choices', '')}")
    if args.ship:
        ship(work)


if __name__ == "__main__":
    main()
