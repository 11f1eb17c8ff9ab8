"""The synthdoc task, the shipped CPU-trained models, ``visorlib demo`` and the synthdoc recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import visorlib
from visorlib import zoo
from visorlib.demo import HELD_OUT_SEED
from visorlib.eval.held_out import held_out_task_accuracy
from visorlib.train import Trainer, load_recipe
from visorlib.train.router import run_router_stage
from visorlib.train.synthdoc import (
    DEFAULT_TASK,
    TASKS,
    held_out_questions,
    make_synthdoc_dataset,
    pages,
    score_samples,
)
from visorlib.train.synthdoc_stamps import CATEGORIES, DRILL, FRAME, INKS, QUADRANTS, stamp_box

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("synthdoc-*.yaml"))
TILE = visorlib.get_config("visor-synthdoc-tiny").vision.image_size

# The held-out questions (per kind, in the order of ``held_out_questions(..., HELD_OUT_SEED, 6)``)
# that the shipped model answers correctly under its full configuration: a regression test of the
# weights and of the processor together (a changed weight, tokenizer or pixel step breaks it).
# Filled in from the shipped weights; the ones it gets wrong, if any, are not asserted either way.
EXPECTED_PAGES = 6
EXPECTED_CORRECT = {"easy": list(range(12)), "hard": list(range(24)), "pair": list(range(6))}
# The summed log-probability of the answer tokens per kind (teacher-forced, full configuration):
# equally correct but different weights, or a changed pixel step, move it.
EXPECTED_LOG_PROB = {"easy": -0.03577, "hard": -0.00572, "pair": -0.00265}


def test_the_shipped_models_task_is_the_default():
    assert DEFAULT_TASK.name == "stamps" and DEFAULT_TASK.categories == CATEGORIES


def test_generator_is_deterministic_per_seed():
    first = [(np.asarray(img), facts, qa) for img, facts, qa in pages(5, 4, TILE)]
    again = [(np.asarray(img), facts, qa) for img, facts, qa in pages(5, 4, TILE)]
    other = [np.asarray(img) for img, _, _ in pages(6, 4, TILE)]
    for (a, fa, qa), (b, fb, qb) in zip(first, again, strict=True):
        assert np.array_equal(a, b) and fa == fb and qa == qb
    assert not all(np.array_equal(a, b) for (a, _, _), b in zip(first, other, strict=True))


def test_every_stamp_lies_inside_one_tile_and_the_page_is_the_tile_grid():
    for image, facts, _ in pages(3, 20, TILE):
        assert image.size == (2 * TILE, 2 * TILE)
        page = np.asarray(image)
        ink = np.all(page == INKS[facts["ink"]], axis=-1)
        inside = np.zeros_like(ink)
        inside[:FRAME], inside[-FRAME:], inside[:, :FRAME], inside[:, -FRAME:] = True, True, True, True
        for quadrant in range(len(QUADRANTS)):
            x0, y0, x1, y1 = stamp_box(quadrant, TILE)
            row, col = divmod(quadrant, 2)
            assert col * TILE <= x0 < x1 <= (col + 1) * TILE and row * TILE <= y0 < y1 <= (row + 1) * TILE
            assert x0 - col * TILE > FRAME and y0 - row * TILE > FRAME  # never touches the border
            inside[y0:y1, x0:x1] = True
        assert not (ink & ~inside).any(), "ink outside the stamps and the border"


def test_processor_sees_the_page_as_2x2_tiles_without_resampling():
    cfg = visorlib.get_config("visor-synthdoc-tiny")
    image, _, _ = next(pages(0, 1, TILE))
    processor = visorlib.models.family_of(cfg).processor(cfg, None)
    out, counts, _ = processor.preprocess(None, [image], None)
    tiles = out["pixel_values"][0]
    assert tiles.shape[0] == 5  # the base tile (the glance) + the 2x2 grid
    page = (np.asarray(image, dtype=np.float32) / 255 - 0.5) / 0.5
    for index in range(4):
        row, col = divmod(index, 2)
        crop = page[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE].transpose(2, 0, 1)
        assert np.abs(tiles[1 + index].numpy() - crop).max() < 1e-5


def test_dataset_files(tmp_path):
    cfg = visorlib.get_config("visor-synthdoc-tiny")
    make_synthdoc_dataset(tmp_path, cfg, pages_count=5, seed=1, eval_pages=3)
    rows = [line for line in (tmp_path / "data.jsonl").read_text().splitlines() if line]
    assert len(rows) == 5 and (tmp_path / "tokenizer.json").exists()
    counts = {c: len((tmp_path / f"{c}.jsonl").read_text().splitlines()) for c in CATEGORIES}
    assert counts == {"easy": 6, "hard": 12, "pair": 3}
    assert not (tmp_path / "drill.jsonl").exists()  # only on request


def test_drill_rows_are_text_only_and_answered_from_the_key(tmp_path):
    cfg = visorlib.get_config("synthdoc-tiny")
    make_synthdoc_dataset(tmp_path, cfg, pages_count=2, seed=1, drill_rows=3)
    rows = [json.loads(line) for line in (tmp_path / "drill.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("image" not in row and row["category"] == "drill" for row in rows)
    key = {"what colour is the background ?": DRILL["background"], "what colour is the ink ?": DRILL["ink"],
           **{f"what pattern is at the {q} ?": p for q, p in DRILL["patterns"].items()}}
    for row in rows:
        turns = row["conversations"]
        assert len(turns) == 14 and not any("<image>" in t["value"] for t in turns)
        for question, reply in zip(turns[::2], turns[1::2], strict=True):
            if question["value"] in key:
                assert reply["value"] == key[question["value"]]
            else:  # the pair question: both patterns, in the order asked
                places = question["value"].removeprefix("what patterns are at the ").removesuffix(" ?").split(" and ")
                assert reply["value"] == " ".join(DRILL["patterns"][p] for p in places)
    assert {t["value"] for row in rows for t in row["conversations"][::2]} >= set(key)  # every question drilled
    # The command line writes it on request and refuses a negative count with one line naming the flag.
    from visorlib.cli import main

    assert main(["data", "synthdoc", str(tmp_path / "cli"), "--pages", "2", "--drill-rows", "2"]) == 0
    assert len((tmp_path / "cli" / "drill.jsonl").read_text().splitlines()) == 2
    assert main(["data", "synthdoc", str(tmp_path / "bad"), "--pages", "2", "--drill-rows", "-1"]) == 2
    # Deterministic per seed, and the pages do not depend on whether a drill was asked for.
    make_synthdoc_dataset(tmp_path / "again", cfg, pages_count=2, seed=1)
    assert (tmp_path / "again" / "data.jsonl").read_text() == (tmp_path / "data.jsonl").read_text()


# -- the shipped models -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["synthdoc-tiny", "visor-synthdoc-tiny"])
def test_shipped_checkpoint_loads_offline_and_matches_its_card(name):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = visorlib.build(name, pretrained=True)
    assert Path(model.checkpoint_dir).resolve() == (ROOT / "zoo" / "weights" / name).resolve()
    card = zoo.instantiate(zoo.get_config(name), "meta")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in card.parameters())
    processor = visorlib.processor_for(model)
    assert processor.tokenizer is not None
    size = sum(f.stat().st_size for f in Path(model.checkpoint_dir).rglob("*.safetensors"))
    assert size < 20 * 2**20


@pytest.fixture(scope="module")
def shipped():
    model = visorlib.build("visor-synthdoc-tiny", pretrained=True)
    return model, visorlib.processor_for(model)


def test_shipped_model_answers_held_out_questions_under_the_full_configuration(shipped):
    model, processor = shipped
    questions = held_out_questions(processor, HELD_OUT_SEED, EXPECTED_PAGES)
    total = 0
    for category in CATEGORIES:
        hits, configs = score_samples(model, questions[category], model.plan.default)
        assert configs == [model.plan.default] * len(hits)
        wrong = [(k, questions[category][k]["question"]) for k in EXPECTED_CORRECT[category] if not hits[k]]
        assert not wrong, f"{category}: the shipped model now gets these wrong: {wrong}"
        total += sum(hits)
    assert total >= sum(map(len, EXPECTED_CORRECT.values()))


def test_shipped_model_log_probabilities_are_pinned(shipped):
    import torch

    from visorlib.data.conversations import collate

    model, processor = shipped
    questions = held_out_questions(processor, HELD_OUT_SEED, EXPECTED_PAGES)
    for category in CATEGORIES:
        batch = collate(questions[category], model.cfg.tokens.pad_token_id)
        batch.pop("batch_num_images", None)
        labels = model.language_model.supervised_labels(batch["input_ids"], batch.pop("labels"))[:, 1:]
        with torch.inference_mode():
            logp = model(**batch, sa_layers=model.plan.default).logits[:, :-1].float().log_softmax(-1)
        picked = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0][labels != -100]
        assert float(picked.sum()) == pytest.approx(EXPECTED_LOG_PROB[category], abs=2e-3), category


def test_shipped_model_generates_the_answers(shipped):
    from visorlib.demo import answer

    model, processor = shipped
    image, _, _ = next(pages(HELD_OUT_SEED, 1, TILE))
    questions = held_out_questions(processor, HELD_OUT_SEED, 1)
    for category, index in (("easy", 0), ("easy", 1), ("hard", 0), ("hard", 1), ("pair", 0)):
        sample = questions[category][index]
        reply, chosen = answer(model, processor, image, sample["question"], model.plan.default)
        assert reply == sample["answer"] and chosen == model.plan.default


def test_demo_runs_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "visorlib.cli", "demo", "--pages", "4", "--examples", "1"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "held-out accuracy" in done.stdout and "router choices" in done.stdout and "at a glance" in done.stdout


def test_at_a_glance_reads_the_table():
    """The demo's closing lines come from the numbers: which kinds the cheapest configuration
    answers and which it does not, what the router spends SA layers on, and what that costs."""
    from visorlib.demo import at_a_glance

    def row(label, sa_layers, easy, hard, pair, flops, choices=None):
        out = {"label": label, "sa_layers": sa_layers, "gflops_per_sample": flops,
               "accuracy": {"easy": easy, "hard": hard, "pair": pair, "all": (2 * easy + 4 * hard + pair) / 7}}
        return out | ({"choices": choices} if choices else {})

    rows = [row("CA-only []", [], 1.0, 0.6, 0.3, 0.012), row("SA 1", [1], 1.0, 1.0, 0.9, 0.022),
            row("SA 1,3,5,6", [1, 3, 5, 6], 1.0, 1.0, 1.0, 0.049),
            row("router", "router", 1.0, 1.0, 0.9, 0.020,
                {"easy": {"CA-only []": 10}, "hard": {"SA 1": 19, "CA-only []": 1}, "pair": {"SA 1": 5}})]
    text = at_a_glance(rows)
    assert "CA-only [] answers easy 1.00 but not hard 0.60, pair 0.30" in text
    assert "SA 1,3,5,6 answers those (hard 1.00, pair 1.00)" in text
    assert "0 % of easy, 95 % of hard, 100 % of pair questions" in text
    router_all = rows[3]["accuracy"]["all"] / rows[2]["accuracy"]["all"]
    assert f"keeps {100 * router_all:.1f} % of SA 1,3,5,6's accuracy at 2.45x fewer LLM FLOPs" in text


# -- the recipes ----------------------------------------------------------------------------------


def test_the_chain_has_every_recipe():
    assert {p.stem for p in RECIPES} == {"synthdoc-read", "synthdoc-dense", "synthdoc-stage1", "synthdoc-stage2",
                                          "synthdoc-independent-1", "synthdoc-independent-ca", "synthdoc-independent-full",
                                          "synthdoc-router", "synthdoc-order-dense", "synthdoc-order-dense2",
                                          "synthdoc-order-stage1", "synthdoc-order-stage2", "synthdoc-order-router",
                                          "synthdoc-order-independent-ca", "synthdoc-order-independent-full"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_synthdoc_recipe_runs_two_shrunk_steps(path, tmp_path):
    assert path.read_text().startswith("# ") and "visorlib" in path.read_text().splitlines()[0]
    recipe = load_recipe(path)
    data = tmp_path / "data"
    task = TASKS["order"] if path.stem.startswith("synthdoc-order-") else TASKS["stamps"]
    make_synthdoc_dataset(data, visorlib.get_config(recipe.model.name), pages_count=4, seed=1, drill_rows=4, task=task)
    if recipe.training.stage == "router":
        datasets = ", ".join(f"{{path: {data / c}.jsonl, name: {c}}}" for c in task.categories)
    else:  # the recipe's own dataset (the drill file or the page folder), moved into tmp_path
        assert recipe.data.datasets[0].path.endswith(("runs/synthdoc/data", "runs/synthdoc/data/drill.jsonl",
                                                      "runs/synthdoc-order/data"))
        source = data / Path(recipe.data.datasets[0].path).name if recipe.data.datasets[0].path.endswith(".jsonl") else data
        datasets = f"{{path: {source}, format: synthetic}}"
    # Start from a checkpoint of the parent stage's architecture, as the chain does (the path a dense
    # checkpoint takes into a VISOR card is visorize, which a from-scratch start would skip).
    parent = None
    if recipe.model.pretrained:
        parent_card = ("synthdoc-tiny" if any(s in recipe.model.pretrained for s in ("/read/", "/dense/", "/dense2/"))
                       else recipe.model.name)
        parent = zoo.instantiate(visorlib.get_config(parent_card)).save_pretrained(tmp_path / "parent")
    shrink = [
        f"model.pretrained={parent}" if parent else "model.pretrained=null", f"data.datasets=[{datasets}]",
        f"data.tokenizer={data}",
        "data.micro_batch_size=2", "training.global_batch_size=2", "training.max_steps=2",
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=2", "logging.metrics_file=null",
        "logging.progress=false", "router.samples_per_dataset=2", "router.steps=2",
        f"router.labels_file={tmp_path / 'ckpt' / 'log.jsonl'}",
    ]
    recipe = load_recipe(path, shrink)
    trainer = Trainer(recipe)
    assert (trainer.model.cfg.visor is None) == (recipe.model.name in ("synthdoc-tiny", "synthdoc-order-tiny"))
    if recipe.training.stage == "router":
        report = run_router_stage(recipe, trainer, held_out_task_accuracy)
        assert "router_accuracy" in report and (tmp_path / "ckpt" / "model" / "tokenizer.json").exists()
    else:
        logs = trainer.train()
        assert len(logs) == 2 and all(log["loss"] > 0 for log in logs)
        assert (tmp_path / "ckpt" / "step_00000002" / "model" / "visorlib.json").exists()
