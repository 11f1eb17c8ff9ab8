"""Can the tiny synthdoc model learn the order task? Dense probes, measured (a negative result).

The order task (:mod:`visorlib.train.synthdoc_order`) is built so that its ``order`` and
``above`` questions provably need a self-attention layer: nothing on a tile or in the glance says
where a stamp is, only the order of the visual tokens does, and cross-attention alone cannot beat
0.5 on them. Before a VISOR chain can show that gap, the *dense* parent must learn those kinds.
This script trains the dense stage of the committed chain (``recipes/synthdoc-read.yaml`` then
``recipes/synthdoc-dense.yaml``, with paths moved into ``--work``) on one *variant* of the task and
scores every checkpoint on held-out pages (``visorlib.demo.HELD_OUT_SEED``): accuracy per kind
(greedy exact match) and the mean negative log-likelihood of the first answer token, which shows
learning before accuracy does::

    OMP_NUM_THREADS=1 python benchmarks/synthdoc_order_probe.py --variant order --work /tmp/probe-order
    python benchmarks/synthdoc_order_probe.py --score-only --work /tmp/probe-order --variant order \\
        --json benchmarks/results/synthdoc-order-probes.json   # adds this variant's rows to the JSON

Variants (each a :class:`~visorlib.train.synthdoc.SynthdocTask`):

* ``order``: the task as committed (easy, find, order, above), tower trained;
* ``order-frozen``: the same with the vision tower frozen at its random initialisation (a
  random tower keeps every ink linearly separable; a trained one may not);
* ``missing``: five inks, "which colour is missing ?" instead of the find questions (answerable
  by averaging every visual token: no lookup), tower frozen;
* ``place``: five inks, easy + missing + "what colour is at the top left ?" for every quadrant
  (located by position, not by a colour word), tower frozen.
* ``row``: the task as committed with "which row is the red in ?" (``top`` / ``bottom``) where it
  asks ``above``: one located look, answered with a place word instead of an ink, tower frozen.

What was measured (``benchmarks/results/synthdoc-order-probes.json``, docs/synthdoc.md): every
variant learns the easy question within ~500 steps and ``missing`` by ~2500, but no variant formed a
lookup — find, order, above and place stayed at chance (first-token NLL 0.69 on yes/no) for
1500-3000 steps, while the stamps task's lookups (by the border the tower sees) appeared after
1500-4000 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visorlib import zoo  # noqa: E402
from visorlib.demo import HELD_OUT_SEED  # noqa: E402
from visorlib.train import Trainer, load_recipe  # noqa: E402
from visorlib.train.synthdoc import TASKS, SynthdocTask, held_out_questions, make_synthdoc_dataset  # noqa: E402
from visorlib.train.synthdoc_order import (  # noqa: E402
    BACKGROUNDS,
    INKS,
    NAMES,
    QUADRANTS,
    located_questions,
    missing_ink,
    render_order_page,
)

RECIPES = ROOT / "recipes"
SIX = tuple(INKS)


def _six_ink_page(rng: random.Random, tile: int):
    """The first version's page: four stamps in four of six inks."""
    return render_order_page(rng, tile, SIX)


def _find_questions(facts: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """The first version's nine questions: "is there a red ?" (one yes, one no), then as now."""
    stamps = facts["stamps"]
    present = list(stamps.values())
    absent = [name for name in SIX if name not in present]
    out = [("easy", "what colour is the background ?", facts["background"]),
           ("find", f"is there a {rng.choice(present)} ?", "yes"),
           ("find", f"is there a {rng.choice(absent)} ?", "no")]
    out += located_questions(stamps, rng)
    rng.shuffle(out)
    return out


def _place_questions(facts: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    out = [("easy", "what colour is the background ?", facts["background"]),
           ("missing", "which colour is missing ?", missing_ink(facts)),
           *[("place", f"what colour is at the {where} ?", facts["stamps"][where]) for where in QUADRANTS]]
    rng.shuffle(out)
    return out


def _row_questions(facts: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """easy, missing, four order and two "which row is the red in ?" questions, shuffled."""
    stamps = facts["stamps"]
    out = [("easy", "what colour is the background ?", facts["background"]),
           ("missing", "which colour is missing ?", missing_ink(facts)),
           *[q for q in located_questions(stamps, rng) if q[0] == "order"]]
    out += [("row", f"which row is the {stamps[where]} in ?", where.split()[0]) for where in rng.sample(QUADRANTS, 2)]
    rng.shuffle(out)
    return out


ORDER = TASKS["order"]
_FIND = dataclasses.replace(
    ORDER, name="order-find", categories=("easy", "find", "order", "above"),
    words=(*"what colour is the background ? there a yes no above nothing".split(), *BACKGROUNDS, *SIX),
    render=_six_ink_page, questions=_find_questions,
    drill={"background": "white", "stamps": dict(zip(QUADRANTS, ("black", "red", "blue", "green"), strict=True))})
#: name -> (task, recipe overrides of the dense stage)
VARIANTS: dict[str, tuple[SynthdocTask, list[str]]] = {
    "find": (_FIND, []),
    "find-frozen": (_FIND, ["training.freeze_vision_tower=true"]),
    "order": (ORDER, ["training.freeze_vision_tower=true"]),
    "place": (dataclasses.replace(
        ORDER, name="order-place", categories=("easy", "missing", "place"), questions=_place_questions,
        words=(*"what which colour is the background missing ? at top bottom left right".split(), *BACKGROUNDS, *NAMES)),
        ["training.freeze_vision_tower=true"]),
    "row": (dataclasses.replace(ORDER, name="order-row", categories=("easy", "missing", "row", "order"),
                                questions=_row_questions, words=(*ORDER.words, "row", "in", "top", "bottom")),
            ["training.freeze_vision_tower=true"]),
}


def train(work: Path, variant: str, steps: int, seed: int, start: Path | None = None) -> None:
    """Reading drill then dense stage, checkpoints every 500 steps, in ``work``.

    ``start``: a dense checkpoint to go on from (a second schedule) instead of drill + dense.
    """
    task, extra = VARIANTS[variant]
    data = work / "data"
    if not (data / "data.jsonl").exists():
        make_synthdoc_dataset(data, zoo.get_config("visor-synthdoc-tiny"), 4000, seed=1, eval_pages=0, drill_rows=200,
                              task=task)
    common = [f"data.tokenizer={data}", f"training.seed={seed}", "logging.progress=false"]
    stages = [("read", "synthdoc-read", data / "drill.jsonl", None, []),
              ("dense", "synthdoc-dense", data, start or work / "read" / "step_00000400" / "model",
               [f"training.max_steps={steps}", "checkpoint.every_steps=500", "checkpoint.keep=100", *extra])]
    for stage, recipe, source, parent, more in stages[1:] if start else stages:
        sets = [*common, f"checkpoint.dir={work / stage}", f"data.datasets=[{{path: {source}, format: synthetic}}]",
                f"logging.metrics_file={work / stage / 'metrics.jsonl'}", *more]
        if parent is not None:
            sets.append(f"model.pretrained={parent}")
        shutil.rmtree(work / stage, ignore_errors=True)
        started = time.perf_counter()
        Trainer(load_recipe(RECIPES / f"{recipe}.yaml", sets)).train()
        print(f"[{variant}] {stage} {time.perf_counter() - started:.0f} s", flush=True)


def score(folder: Path, task: SynthdocTask, pages: int) -> dict:
    """Accuracy and first-answer-token NLL per kind of the dense model in ``folder``."""
    from visorlib.data.conversations import collate

    model = zoo.from_pretrained(folder).eval()
    questions = held_out_questions(zoo.processor_for(model), HELD_OUT_SEED, pages, task)
    out = {}
    for kind, samples in questions.items():
        batch = collate(samples, model.cfg.tokens.pad_token_id)
        batch.pop("batch_num_images", None)
        labels = model.language_model.supervised_labels(batch["input_ids"], batch.pop("labels"))[:, 1:]
        with torch.inference_mode():
            logits = model(**batch).logits[:, :-1].float()
        hits = ((logits.argmax(-1) == labels) | (labels == -100)).all(-1)
        rows = torch.arange(len(labels))
        first = (labels != -100).float().argmax(-1)
        nll = -logits.log_softmax(-1)[rows, first, labels[rows, first]]
        out[kind] = {"accuracy": round(hits.float().mean().item(), 4), "first_token_nll": round(nll.mean().item(), 4)}
    return out


def ink_probe(folder: Path, pages: int = 60) -> float:
    """Held-out accuracy of a ridge probe telling a stamp's ink from one projector output token.

    Whether the tiles' visual tokens still carry the ink a question names (a trained tower may
    drop what it has not yet needed): fit on 3/4 of the stamp tokens of ``pages`` pages, scored
    on the rest (pages of six inks); chance is 1/6.
    """
    import numpy as np

    from visorlib.train.synthdoc import pages as draw

    model = zoo.from_pretrained(folder).eval()
    processor = zoo.processor_for(model)
    side = model.cfg.vision.image_size // model.cfg.vision.patch_size
    features, inks = [], []
    for image, facts, _ in draw(99, pages, model.cfg.vision.image_size, _FIND):
        pixels = processor.preprocess(["<image>"], [image], None)[0]["pixel_values"][0]
        with torch.no_grad():
            tokens = model.projector(model.vision_tower(pixels))
        for quadrant, name in enumerate(facts["stamps"].values()):
            grid = tokens[1 + quadrant].reshape(side, side, -1)
            inner = grid[side // 4: side - side // 4, side // 4: side - side // 4].reshape(-1, grid.shape[-1])
            features += [t.numpy() for t in inner]
            inks += [SIX.index(name)] * len(inner)
    x = np.c_[np.asarray(features), np.ones(len(features))]
    y = np.eye(len(SIX))[inks]
    cut = len(x) * 3 // 4
    weights = np.linalg.solve(x[:cut].T @ x[:cut] + 1e-2 * np.eye(x.shape[1]), x[:cut].T @ y[:cut])
    return float(((x[cut:] @ weights).argmax(1) == np.asarray(inks[cut:])).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--work", required=True, help="run folder (data, read/, dense/)")
    parser.add_argument("--steps", type=int, default=3000, help="dense steps")
    parser.add_argument("--seed", type=int, default=0, help="training.seed of both stages")
    parser.add_argument("--pages", type=int, default=20, help="held-out pages scored per checkpoint")
    parser.add_argument("--score-only", action="store_true", help="only score the checkpoints already in --work")
    parser.add_argument("--continue-from", type=Path, help="a dense checkpoint's model folder to go on from")
    parser.add_argument("--name", help="the entry's name in --json (default: the variant)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "synthdoc-order-probes.json"),
                        help="results file; this variant's entry is replaced, the others kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    if not args.score_only:
        train(work, args.variant, args.steps, args.seed, args.continue_from)
    task, extra = VARIANTS[args.variant]
    checkpoints = sorted((work / "dense").glob("step_*"))
    curve = [json.loads(line) for line in (work / "dense" / "metrics.jsonl").read_text().splitlines()]
    entry = {"task": task.name, "continued_from": str(args.continue_from) if args.continue_from else None, "kinds": list(task.categories), "overrides": extra, "seed": args.seed,
             "held_out_seed": HELD_OUT_SEED, "held_out_pages": args.pages, "threads": 1,
             "loss_every_100_steps": [round(row["loss"], 3) for row in curve if row["step"] % 100 == 0],
             "checkpoints": {c.name: score(c / "model", task, args.pages) for c in checkpoints}}
    if checkpoints:
        entry["ink_probe_last_checkpoint"] = round(ink_probe(checkpoints[-1] / "model"), 3)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.name or args.variant] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    for name, kinds in entry["checkpoints"].items():
        print(args.variant, name, " | ".join(f"{k} {v['accuracy']:.2f} (nll {v['first_token_nll']:.2f})"
                                             for k, v in kinds.items()), flush=True)


if __name__ == "__main__":
    main()
