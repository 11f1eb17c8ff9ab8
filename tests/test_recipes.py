"""Every shipped recipe loads strictly and, shrunk to a tiny model on synthetic data, runs two steps."""

from __future__ import annotations

from pathlib import Path

import pytest

import visorlib
from visorlib.eval.held_out import held_out_task_accuracy
from visorlib.train import Trainer, load_recipe, make_synthetic_dataset
from visorlib.train.router import run_router_stage

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    for size in ("0.5b", "1.5b"):
        assert {f"visor-llava-ov-{size}-stage1", f"visor-llava-ov-{size}-stage2", f"visor-llava-ov-{size}-router"} <= names
    assert "tiny-cpu-synthetic" in names and "visor-llava-ov-0.5b-multi-image" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_two_steps_shrunk(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "visorlib" in first, "a recipe opens with the command that runs it"
    recipe = load_recipe(path)
    data = tmp_path / "synth"
    make_synthetic_dataset(data, visorlib.get_config(recipe.model.name).tiny(), samples=4, image_size=60)
    shrink = [
        "model.tiny=true", "model.pretrained=null",
        f"data.datasets=[{{path: {data}, format: synthetic}}]", f"data.tokenizer={data}",
        "data.micro_batch_size=2", "data.max_length=2048",
        "training.global_batch_size=2", "training.max_steps=2", "training.bf16=false",
        "training.activation_checkpointing=true",
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=2", "logging.metrics_file=null",
        "logging.progress=false", "router.samples_per_dataset=2", "router.steps=2",
        "router.labels_file=null",  # a recipe's own log path must not be written to by the test
    ]
    recipe = load_recipe(path, shrink)
    trainer = Trainer(recipe)
    if recipe.training.stage == "router":
        report = run_router_stage(recipe, trainer, held_out_task_accuracy)
        assert "router_accuracy" in report
        # Task accuracy of every fixed configuration (before and after) and of the router, held out.
        plan = trainer.model.plan
        labels = {",".join(map(str, c)) or "none" for c in plan.configurations}
        (before,) = report["task_accuracy_before_router_training"].values()
        after = {k: v for k, v in report["task_accuracy"].items() if k != "router_choices"}
        assert set(before) == labels and set(next(iter(after.values()))) == labels | {"router"}
        (choices,) = report["task_accuracy"]["router_choices"].values()
        assert sum(choices.values()) >= 1 and set(choices) <= labels
    else:
        logs = trainer.train()
        assert len(logs) == 2 and all(log["loss"] > 0 for log in logs)
        assert (tmp_path / "ckpt" / "step_00000002" / "model" / "visorlib.json").exists()
