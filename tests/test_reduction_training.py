"""A recipe trains with token reduction: the card field (model.overrides.token_reduction) reaches the
processor (reduced placeholder counts) and the forward pass, and the exported checkpoint keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import visorlib
from visorlib.train import Trainer, load_recipe, make_synthetic_dataset

RECIPE = Path(__file__).parent.parent / "recipes" / "tiny-cpu-synthetic.yaml"


@pytest.mark.parametrize("spec", [{"method": "fastv", "keep": 0.5, "layer": 2}, {"method": "pooling", "keep": 0.25}],
                         ids=["fastv", "pooling"])
def test_recipe_trains_two_steps_with_token_reduction(spec, tmp_path):
    data = tmp_path / "synth"
    make_synthetic_dataset(data, visorlib.get_config("visor-llava-ov-0.5b").tiny(), samples=4, image_size=60)
    recipe = load_recipe(RECIPE, [
        "model.tiny=true", f"model.overrides={{token_reduction: [{json.dumps(spec)}]}}",
        f"data.datasets=[{{path: {data}, format: synthetic}}]", f"data.tokenizer={data}",
        "data.micro_batch_size=2", "training.global_batch_size=2", "training.max_steps=2",
        f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=2", "logging.metrics_file=null",
        "logging.progress=false",
    ])
    trainer = Trainer(recipe)
    assert trainer.model.cfg.token_reduction == [spec]
    batch = trainer.datasets[0][0]
    visual = int((batch["input_ids"] == trainer.model.cfg.tokens.image_token_id).sum())
    unreduced = trainer.model.cfg.with_overrides({"token_reduction": None})
    full = visorlib.models.family_of(unreduced).processor(unreduced, None)
    if spec["method"] == "pooling":  # the training data was expanded to the reduced count
        assert visual < full.num_image_tokens((60, 60))
    logs = trainer.train()
    assert len(logs) == 2 and all(log["loss"] > 0 and torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    saved = json.loads((tmp_path / "ckpt" / "step_00000002" / "model" / "visorlib.json").read_text())
    assert saved["config"]["token_reduction"] == [spec]
