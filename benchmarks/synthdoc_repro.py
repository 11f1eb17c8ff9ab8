"""The synthdoc reproduction: the whole paper pipeline at tiny scale, from scratch, on a CPU.

Runs the recipes of ``recipes/synthdoc-*.yaml`` in order (reading drill -> dense -> VISOR stage 1 -> stage 2
universal -> the independent CA-only and full baselines -> router), each through the same ``Trainer``
that ``visorlib train`` uses, with every path redirected into ``--work``; then scores every model on
held-out pages of a seed no recipe trains on (``visorlib.demo.HELD_OUT_SEED``) and writes one JSON
of accuracy per question kind vs language-model FLOPs, the router's choices, the training curves,
the wall-clock time of every stage and the issue's targets checked one by one::

    OMP_NUM_THREADS=1 python benchmarks/synthdoc_repro.py --work /tmp/synthdoc \\
        --json benchmarks/results/synthdoc-repro.json [--seed-offset 1] [--ship]

``--task order`` runs the same chain on the order task (docs/synthdoc.md) and checks the issue's
targets one by one (``claims``). The recorded stamps run used the chain of its day, with an
independent [1] baseline where the chain now trains the independent CA-only one.

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
from visorlib.train.synthdoc import DEFAULT_TASK, TASKS, SynthdocTask, make_synthdoc_dataset  # noqa: E402

RECIPES = ROOT / "recipes"
# (stage name, recipe, the stage whose exported model it starts from)
CHAIN = [("read", "synthdoc-read", None), ("dense", "synthdoc-dense", "read"), ("stage1", "synthdoc-stage1", "dense"),
         ("stage2", "synthdoc-stage2", "stage1"), ("independent-ca", "synthdoc-independent-ca", "stage1"),
         ("independent-full", "synthdoc-independent-full", "stage1"), ("router", "synthdoc-router", "stage2")]
#: The order task's chain: two dense schedules with the tower frozen, then its own VISOR card's
#: stages; the router right after stage 2, so the shipped model is ready before the baselines.
CHAIN_ORDER = [("read", "synthdoc-read", None), ("dense", "synthdoc-order-dense", "read"),
               ("dense2", "synthdoc-order-dense2", "dense"), ("stage1", "synthdoc-order-stage1", "dense2"),
               ("stage2", "synthdoc-order-stage2", "stage1"), ("router", "synthdoc-order-router", "stage2"),
               ("independent-ca", "synthdoc-order-independent-ca", "stage1"),
               ("independent-full", "synthdoc-order-independent-full", "stage1")]
CHAINS = {"stamps": CHAIN, "order": CHAIN_ORDER}
#: Each task's VISOR card (its full configuration is the card's default).
CARDS = {"stamps": "visor-synthdoc-tiny", "order": "visor-synthdoc-order-tiny"}


def dense_stage(chain: list) -> str:
    """The chain's last dense stage: the parent of VISOR stage 1."""
    return next(parent for stage, _, parent in chain if stage == "stage1")


def exported(work: Path, stage: str) -> Path:
    """The loadable ``model/`` folder a stage left in its run folder."""
    if stage == "router":
        return work / stage / "model"
    run = work / stage
    return run / (run / "latest").read_text().strip() / "model"


def run_stage(work: Path, stage: str, recipe_name: str, parent: str | None, scale: float, seed_offset: int = 0,
              steps: int | None = None, task: SynthdocTask = DEFAULT_TASK) -> dict:
    """Train one recipe with its paths moved into ``work``; returns its timing and curve.

    ``steps`` replaces the recipe's ``training.max_steps`` (before ``scale``).
    """
    base = load_recipe(RECIPES / f"{recipe_name}.yaml")
    data = work / ("router-data" if stage == "router" else "data")
    sets = [f"checkpoint.dir={work / stage}", f"data.tokenizer={data}",
            f"training.seed={base.training.seed + seed_offset}"]
    if stage == "router":
        sets.append(f"data.datasets=[{', '.join(f'{{path: {data / k}.jsonl, name: {k}}}' for k in task.categories)}]")
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


def curve(metrics: Path) -> list[dict]:
    """About 40 ``{step, loss}`` points of a stage's ``metrics.jsonl``."""
    logs = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{"step": m["step"], "loss": round(m["loss"], 4)} for m in logs[:: max(1, len(logs) // 40)]]


def score(folder: Path, pages: int, only=None, task: SynthdocTask = DEFAULT_TASK) -> list[dict]:
    """Held-out rows of :func:`visorlib.demo.evaluate` for the model in ``folder``."""
    model = zoo.from_pretrained(folder)
    processor = zoo.processor_for(model)
    rows = evaluate(model, processor, HELD_OUT_SEED, pages, task)
    return [r for r in rows if only is None or r["sa_layers"] == only]


def ship(work: Path, task: SynthdocTask = DEFAULT_TASK) -> None:
    """Copy the dense and the final VISOR model, with recipes and logs, into ``zoo/weights/``.

    The stamps task ships as ``synthdoc-tiny`` / ``visor-synthdoc-tiny``, the order task as
    ``synthdoc-order-tiny`` / ``visor-synthdoc-order-tiny``; each folder gets a ``synthdoc.json`` naming its
    task, which ``visorlib demo`` reads (:func:`visorlib.train.synthdoc.task_of`).
    """
    chain = CHAINS[task.name]
    dense = dense_stage(chain)
    prefix = "synthdoc-order-tiny" if task.name == "order" else "synthdoc-tiny"
    recipes = {stage: recipe for stage, recipe, _ in chain}
    for name, stage in ((prefix, dense), (f"visor-{prefix}", "router")):
        target = ROOT / "zoo" / "weights" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(exported(work, stage), target)
        (target / "recipes").mkdir()
        upto = [s for s, _, _ in chain if not s.startswith("independent")]
        for part in upto[:upto.index(stage) + 1]:
            shutil.copy(RECIPES / f"{recipes[part]}.yaml", target / "recipes")
            for log in ("metrics.jsonl", "router-report.json"):
                if (work / part / log).exists():
                    shutil.copy(work / part / log, target / "recipes" / f"{part}-{log}")
        (target / "synthdoc.json").write_text(json.dumps({"task": task.name}) + "\n")
        print(f"shipped {target}")




def markdown(result: dict) -> str:
    """The accuracy-vs-FLOPs table of a result JSON, as Markdown (for docs/synthdoc.md)."""
    names = {"dense": "dense parent", "stage1": "VISOR after stage 1", "universal": "VISOR universal",
             "independent-ca": "independent []", "independent-full": "independent full",
             "independent-1": "independent [1]"}
    kinds = [k for k in result["evaluation"]["dense"][0]["accuracy"] if k != "all"]
    lines = ["| model | configuration | " + " | ".join(kinds) + " | all | LLM MFLOPs / sample |",
             "|---|---|" + "---|" * len(kinds) + "---|---|"]
    for key, rows in result["evaluation"].items():
        for row in rows:
            acc = row["accuracy"]
            lines.append(f"| {names.get(key, key)} | {row['label']} | " + " | ".join(f"{acc[k]:.3f}" for k in kinds)
                         + f" | {acc['all']:.3f} | {row['gflops_per_sample'] * 1e3:.2f} |")
    return "\n".join(lines + ["", *(claims(result) if result.get("task") == "order" else [])])


def claims(result: dict) -> list[str]:
    """The issue's targets checked against a result of the order task, one line each (met or not).

    The easy kinds are those the CA-only bound allows (``easy``, ``missing``), the hardest is the
    last kind (``above``).
    """
    ev = result["evaluation"]
    dense = ev["dense"][0]["accuracy"]
    uni = {r["label"]: r for r in ev["universal"]}
    full_label = "SA " + ",".join(map(str, zoo.get_config(CARDS[result["task"]]).visor.default))
    full, ca, router = uni[full_label], uni["CA-only []"], uni["router"]
    ind_ca, ind_full = (ev[k][0] if k in ev else None for k in ("independent-ca", "independent-full"))
    kinds = [k for k in dense if k != "all"]
    bound = result.get("ca_only_bound", {})
    easy = [k for k in kinds if bound.get(k, 1.0) == 1.0]
    hardest = kinds[-1]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def acc(row, kind="all") -> float:
        return row["accuracy"][kind]

    def choices(kind: str) -> tuple[float, float]:
        counts = router["choices"][kind]
        total = max(1, sum(counts.values()))
        return counts.get("CA-only []", 0) / total, 1 - counts.get("CA-only []", 0) / total

    saving = full["gflops_per_sample"] / router["gflops_per_sample"]
    share = acc(router) / max(acc(full), 1e-9)
    return [
        f"- full >= 0.90 on every kind: {mark(min(acc(full, k) for k in kinds) >= 0.9)} "
        f"({', '.join(f'{k} {acc(full, k):.3f}' for k in kinds)})",
        f"- dense >= 0.90 on every kind: {mark(min(dense[k] for k in kinds) >= 0.9)} "
        f"({', '.join(f'{k} {dense[k]:.3f}' for k in kinds)})",
        f"- CA-only trails full by >= 20 points on {hardest}: {mark(acc(full, hardest) - acc(ca, hardest) >= 0.2)} "
        f"({acc(ca, hardest):.3f} vs {acc(full, hardest):.3f}; the CA-only bound is {bound.get(hardest, float('nan')):.2f})",
        f"- CA-only within 2 points of full on the easy kinds ({', '.join(easy)}): "
        f"{mark(all(acc(full, k) - acc(ca, k) <= 0.02 for k in easy))} "
        f"({', '.join(f'{k} {acc(ca, k):.3f} vs {acc(full, k):.3f}' for k in easy)})",
        (f"- universal within 3 points of independent (all questions): "
         f"{mark(abs(acc(ca) - acc(ind_ca)) <= 0.03 and abs(acc(full) - acc(ind_full)) <= 0.03)} "
         f"(CA-only {acc(ca):.3f} vs {acc(ind_ca):.3f}; full {acc(full):.3f} vs {acc(ind_full):.3f})"
         if ind_ca and ind_full else "- universal within 3 points of independent: NOT checked (a baseline was not trained)"),
        f"- router >= 97 % of full at >= 2x fewer LLM FLOPs: {mark(share >= 0.97 and saving >= 2)} "
        f"({100 * share:.1f} % at {saving:.2f}x)",
        f"- router sends >= 80 % of easy questions to CA-only: {mark(all(choices(k)[0] >= 0.8 for k in easy))} "
        f"({', '.join(f'{k} {100 * choices(k)[0]:.0f} %' for k in easy)})",
        f"- router sends >= 80 % of {hardest} questions to SA: {mark(choices(hardest)[1] >= 0.8)} "
        f"({100 * choices(hardest)[1]:.0f} %; choices {router['choices']})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/synthdoc-repro", help="run folder (data, checkpoints)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "synthdoc-repro.json"))
    parser.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK.name)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick check)")
    parser.add_argument("--pages", type=int, default=100, help="held-out pages scored per model")
    parser.add_argument("--skip-training", action="store_true", help="only score the models already in --work")
    parser.add_argument("--start-at", choices=[stage for stage, _, _ in CHAIN_ORDER], default="read",
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
    task = TASKS[args.task]
    work = Path(args.work)
    started = time.perf_counter()
    result: dict = {"machine": "shared 2-core CPU (other jobs running; timings are upper bounds)", "task": task.name,
                    "threads": 1, "held_out_seed": HELD_OUT_SEED, "held_out_pages": args.pages,
                    "scale": args.scale, "seed_offset": args.seed_offset, "start_at": args.start_at, "stages": {}}
    if task.name == "order":
        from visorlib.train.synthdoc import pages
        from visorlib.train.synthdoc_order import row_blind_bound

        drawn = list(pages(HELD_OUT_SEED, args.pages, zoo.get_config(CARDS[task.name]).vision.image_size, task))
        result["ca_only_bound"] = row_blind_bound([f for _, f, _ in drawn], [qa for _, _, qa in drawn])
    if not args.skip_training:
        cfg = zoo.get_config(CARDS[task.name])
        t = time.perf_counter()
        if args.start_at == "read":
            make_synthdoc_dataset(work / "data", cfg, 4000, seed=1, eval_pages=0, drill_rows=200, task=task)
        if args.start_at == "read" or not (work / "router-data").exists():
            make_synthdoc_dataset(work / "router-data", cfg, 150, seed=2, task=task)
        result["data_seconds"] = time.perf_counter() - t
        chain = CHAINS[task.name]
        stages = [stage for stage, _, _ in chain]
        for stage, recipe, parent in chain[stages.index(args.start_at):]:
            result["stages"][stage] = run_stage(work, stage, recipe, parent, args.scale, args.seed_offset, task=task)
        result["train_seconds"] = time.perf_counter() - started
    dense = dense_stage(CHAINS[task.name])
    full = zoo.get_config(CARDS[task.name]).visor.default
    scored = {"dense": (dense, None), "stage1": ("stage1", None), "universal": ("router", None),
              "independent-ca": ("independent-ca", []), "independent-full": ("independent-full", full)}
    # A stage that was not trained (a chain stopped early, then scored with --skip-training) is
    # left out of the table, and the claims say so; its absence is never silent.
    evaluation = {key: score(exported(work, stage), args.pages, only, task)
                  for key, (stage, only) in scored.items() if (work / stage).exists()}
    if args.skip_training:
        result["stages"] = {stage: {"curve_from": "metrics.jsonl", "curve": curve(work / stage / "metrics.jsonl")}
                            for stage, _, _ in CHAINS[task.name] if (work / stage / "metrics.jsonl").exists()}
    result["evaluation"] = evaluation
    result["total_seconds"] = time.perf_counter() - started
    if task.name == "order":
        result["claims"] = claims(result)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result) if task.name == "order" else json.dumps(evaluation)[:2000])
    if args.ship:
        ship(work, task)


if __name__ == "__main__":
    main()
