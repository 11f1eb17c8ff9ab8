"""Vision *on request* at tiny scale: the unmarked synthdoc layout, a measured negative result.

The shipped ``visor-synthdoc-tiny`` answers every question under every configuration, so nothing
in it needs a self-attention (SA) layer. This experiment changes the page so that the located
questions *provably* need one, and measures whether the tiny chain learns it on a CPU.

**The unmarked layout** (:func:`render_unmarked_page`): the synthdoc facts and questions, but no
border, every stamp in the same ink in the middle half of its tile, and three patterns of one-pixel
lines (vertical, horizontal, checker) that the 2x-shrunk base tile blurs to one half-tone. The
vision tower encodes each tile alone with the same position embedding, so a tile's tokens hold what
its stamp is but not whether it is at the top or the bottom of the page: only the visual token
*sequence* says that.

**Why cross-attention only (CA-only) cannot locate.** Under CA-only the visual tokens are never
updated after the projector and cross-attention has no rotary position; its positional signal is a
depth-wise convolution reaching three tokens either side in raster order, which tells a left-half
token from a right-half one (the row's newline is two or three tokens to one side) but not a top
token from a bottom one. The best such reader knows each column's patterns but not their order:
:func:`located_reader_bound` computes its accuracy exactly (2/3 on hard, 14/27 on pair questions).
An executed SA layer attends over the sequence with rotary positions and can locate every tile.

**What was measured** (``benchmarks/results/synthdoc-unmarked.json``, docs/synthdoc.md): the chain
of ``benchmarks/synthdoc_repro.py`` (reading drill, dense, stage 1, stage 2 universal, independent
CA-only and full baselines, router) on unmarked pages. The dense model did not learn to locate tiles
in 5000 steps (held out: hard 0.59, pair 0.35, *below* the CA-only bound), so no configuration
does, and the gap the layout was built for cannot show::

    OMP_NUM_THREADS=1 python benchmarks/synthdoc_unmarked.py --work /tmp/unmarked --json out.json

The recorded run came from the first version of this code, whose tokenizer listed only the three
patterns used here and whose reading drill answered ``vertical`` for the bottom right (this
version keeps the shipped task's vocabulary and drill key): a rerun's numbers differ in detail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthdoc_repro import exported, run_stage, score  # noqa: E402

from visorlib import zoo  # noqa: E402
from visorlib.demo import HELD_OUT_SEED  # noqa: E402
from visorlib.train.synthdoc import (  # noqa: E402
    TASKS,  # noqa: E402
    make_synthdoc_dataset,
    pages,
)
from visorlib.train.synthdoc_stamps import (  # noqa: E402
    BACKGROUNDS,
    CATEGORIES,
    INKS,
    QUADRANTS,
    pattern_mask,
)

#: The three binary patterns of period 2 with half their pixels inked: one fixed picture per
#: 8-px patch at full resolution, one flat half-tone in the base tile.
UNMARKED_PATTERNS = ("vertical", "horizontal", "checker")

#: (stage, recipe, parent, steps of the recorded run): the committed synthdoc recipes with the
#: budgets the run used (the recipes' own are those of the shipped marked chain).
CHAIN = [("read", "synthdoc-read", None, None), ("dense", "synthdoc-dense", "read", 5000),
         ("stage1", "synthdoc-stage1", "dense", None), ("stage2", "synthdoc-stage2", "stage1", 1200),
         ("independent-ca", "synthdoc-independent-ca", "stage1", 1200),
         ("independent-full", "synthdoc-independent-full", "stage1", 1200), ("router", "synthdoc-router", "stage2", None)]


def stamp_box(quadrant: int, tile: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the stamp in ``quadrant``: the middle half of its tile.

    The quarter-tile margin keeps every stamp pixel off the tile's outer ring of patches, so no
    stamp patch sits next to the image's first or last tokens or a row's newline.
    """
    margin = tile // 4
    row, col = divmod(quadrant, 2)
    x0, y0 = col * tile + margin, row * tile + margin
    return x0, y0, x0 + tile - 2 * margin, y0 + tile - 2 * margin


def render_unmarked_page(rng: random.Random, tile: int) -> tuple[Image.Image, dict]:
    """One unmarked page and its facts: nothing on it says where a tile is (module docstring)."""
    if tile < 16 or tile % 8:
        raise ValueError(f"the unmarked layout needs a tile side that is a multiple of 8 and >= 16 px, got {tile}")
    background, ink = rng.choice(list(BACKGROUNDS)), rng.choice(list(INKS))
    patterns = [rng.choice(UNMARKED_PATTERNS) for _ in QUADRANTS]
    page = np.empty((2 * tile, 2 * tile, 3), np.uint8)
    page[:] = BACKGROUNDS[background]
    for quadrant, name in enumerate(patterns):
        x0, y0, x1, y1 = stamp_box(quadrant, tile)
        page[y0:y1, x0:x1][pattern_mask(name, x1 - x0, 2)] = INKS[ink]
    facts = {"background": background, "ink": ink, "patterns": dict(zip(QUADRANTS, patterns, strict=True))}
    return Image.fromarray(page), facts


def unmarked_task():
    """The stamps task's questions on unmarked pages."""
    return dataclasses.replace(TASKS["stamps"], name="unmarked", render=render_unmarked_page)


def located_reader_bound(seed: int, count: int, tile: int = 32) -> dict[str, float]:
    """Best expected accuracy of a reader that knows each stamp's pattern and column, not its row.

    Given what it sees (per column, the two patterns as an unordered pair) the four row
    assignments (swap each column or not) are equally likely, so its best accuracy on a question
    is the share of them that give the true answer; averaged over the questions of ``count``
    unmarked pages of ``seed``. Easy questions need no place: 1.
    """
    scores: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    columns = (("top left", "bottom left"), ("top right", "bottom right"))
    for _, facts, qa in pages(seed, count, tile, unmarked_task()):
        truth = facts["patterns"]
        worlds = []
        for swaps in ((False, False), (False, True), (True, False), (True, True)):
            world = dict(truth)
            for swap, (top, bottom) in zip(swaps, columns, strict=True):
                if swap:
                    world[top], world[bottom] = truth[bottom], truth[top]
            worlds.append(world)
        for category, question, answer in qa:
            asked = sorted((where for where in QUADRANTS if where in question), key=question.index)
            hits = [category == "easy" or " ".join(world[w] for w in asked) == answer for world in worlds]
            scores[category].append(sum(hits) / len(worlds))
    return {c: sum(v) / len(v) for c, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/synthdoc-unmarked", help="run folder (data, checkpoints)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "synthdoc-unmarked.json"))
    parser.add_argument("--pages", type=int, default=100, help="held-out pages scored per model")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every stage's training.seed")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick check)")
    parser.add_argument("--skip-training", action="store_true", help="only score the models already in --work")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work, started = Path(args.work), time.perf_counter()
    result: dict = {"layout": "unmarked", "threads": 1, "held_out_seed": HELD_OUT_SEED, "held_out_pages": args.pages,
                    "seed_offset": args.seed_offset, "scale": args.scale,
                    "ca_only_bound": located_reader_bound(HELD_OUT_SEED, args.pages), "stages": {}}
    if not args.skip_training:
        cfg = zoo.get_config("visor-synthdoc-tiny")
        make_synthdoc_dataset(work / "data", cfg, 4000, seed=1, eval_pages=0, drill_rows=200, task=unmarked_task())
        make_synthdoc_dataset(work / "router-data", cfg, 150, seed=2, task=unmarked_task())
        for stage, recipe, parent, steps in CHAIN:
            result["stages"][stage] = run_stage(work, stage, recipe, parent, args.scale, args.seed_offset, steps, unmarked_task())
    task = unmarked_task()
    result["evaluation"] = {
        "dense": score(exported(work, "dense"), args.pages, task=task),
        "stage1": score(exported(work, "stage1"), args.pages, task=task),
        "universal": score(exported(work, "router"), args.pages, task=task),
        "independent-ca": score(exported(work, "independent-ca"), args.pages, [], task),
        "independent-full": score(exported(work, "independent-full"), args.pages, [1, 3, 5, 6], task),
    }
    result["total_seconds"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("CA-only bound:", {k: round(v, 3) for k, v in result["ca_only_bound"].items()})
    for name, rows in result["evaluation"].items():
        for row in rows:
            acc = row["accuracy"]
            print(f"{name:18s} {row['label']:14s} easy {acc['easy']:.2f} hard {acc['hard']:.2f} pair {acc['pair']:.2f} "
                  f"LLM {row['gflops_per_sample'] * 1e3:.2f} MFLOPs {row.get('choices', '')}")


if __name__ == "__main__":
    main()
