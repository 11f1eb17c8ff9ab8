"""Training: it learns, stages freeze the right things, resume is exact, saves are atomic, data and
recipe errors are clear."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import visorlib
from visorlib.config import ConfigError
from visorlib.train import DataError, Trainer, configuration_for_step, load_recipe, make_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(folder, visorlib.get_config("visor-llava-ov-0.5b").tiny(), samples=12, image_size=60)
    return folder


def write_recipe(tmp_path, synth, **sections):
    recipe = {
        "model": {"name": "visor-llava-ov-0.5b", "tiny": True},
        "data": {"datasets": [{"path": str(synth), "format": "synthetic"}], "tokenizer": str(synth),
                 "micro_batch_size": 2, "max_length": 2048},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "training": {"stage": 2, "mode": "universal", "global_batch_size": 4, "max_steps": 4, "bf16": False},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
        "logging": {"progress": False, "metrics_file": str(tmp_path / "metrics.jsonl")},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_loss_decreases_on_the_synthetic_task(tmp_path, synth):
    trainer = Trainer(load_recipe(write_recipe(tmp_path, synth, training={"max_steps": 24},
                                               checkpoint={"every_steps": 100})))
    logs = trainer.train()
    first, last = [sum(m["loss"] for m in logs[i:i + 4]) / 4 for i in (0, len(logs) - 4)]
    assert last < 0.7 * first
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"loss", "lr", "tokens_per_s", "configuration"} <= set(rows[0])


def test_stage_one_trains_only_the_visor_blocks(tmp_path, synth):
    trainer = Trainer(load_recipe(write_recipe(tmp_path, synth, training={"stage": 1, "max_steps": 2})))
    before = params(trainer)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("language_model.cross_attention.") for n in changed)
    assert any(".q_proj." in n for n in changed)


def test_universal_configurations_are_a_function_of_seed_and_step():
    plan = visorlib.build("visor-llava-ov-0.5b", device="meta").plan
    first = [configuration_for_step(plan, "universal", None, 7, s) for s in range(50)]
    again = [configuration_for_step(plan, "universal", None, 7, s) for s in range(50)]
    assert first == again and len({tuple(c) for c in first}) > 5
    assert all(c in plan.configurations for c in first)
    assert configuration_for_step(plan, "independent", [1, 4], 7, 3) == [1, 4]


def test_resume_is_bit_exact(tmp_path, synth):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = Trainer(load_recipe(write_recipe(tmp_path / "a", synth)))
    straight.train()
    recipe_b = write_recipe(tmp_path / "b", synth)
    first = Trainer(load_recipe(recipe_b))
    first.train(max_steps=2)  # checkpoint at step 2, then the process "dies"
    resumed = Trainer(load_recipe(recipe_b), resume=True)
    assert resumed.step == 2
    resumed.train()
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    exported = visorlib.from_pretrained(tmp_path / "b" / "ckpt" / "step_00000004" / "model")
    assert torch.equal(exported.cross_attention["0"].q_proj.weight, resumed.model.cross_attention["0"].q_proj.weight)


def test_resume_reads_a_run_saved_with_the_flat_parameter_names(tmp_path, synth):
    """A run saved before the language model owned its parts keyed its optimizer by ``decoder.*``."""
    import torch.distributed.checkpoint as dcp

    from visorlib.train.trainer import _flat_name, _optimizer_names

    recipe = write_recipe(tmp_path, synth, training={"max_steps": 2})
    first = Trainer(load_recipe(recipe))
    first.train()
    state = first._state()
    old = {"model": state["model"], "optim": _optimizer_names(state["optim"], _flat_name)}
    assert any(k.startswith("decoder.") for k in old["optim"]["state"])
    folder = tmp_path / "ckpt" / "step_00000002"
    (folder / ".metadata").unlink()
    dcp.save(old, checkpoint_id=str(folder))
    resumed = Trainer(load_recipe(write_recipe(tmp_path, synth, training={"max_steps": 3})), resume=True,
                      allow_recipe_change=True)
    assert resumed.step == 2
    mine, theirs = resumed.optimizer.state_dict()["state"], first.optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k]["exp_avg"], theirs[k]["exp_avg"]) for k in mine)


def test_killed_save_leaves_the_previous_checkpoint(tmp_path, synth, monkeypatch):
    recipe = write_recipe(tmp_path, synth)
    trainer = Trainer(load_recipe(recipe))
    trainer.train(max_steps=2)
    good = params(trainer)

    def die(state, checkpoint_id):
        (tmp_path / "ckpt" / ".tmp_step_00000004" / "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt("killed during save")

    trainer.train_step()
    trainer.train_step()
    monkeypatch.setattr("visorlib.train.trainer.dcp.save", die)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    fresh = Trainer(load_recipe(recipe), resume=True)
    assert fresh.step == 2 and fresh.latest_checkpoint().name == "step_00000002"
    assert all(torch.equal(p, good[n]) for n, p in fresh.model.named_parameters())


def test_bad_data_is_reported_with_file_and_index(tmp_path, synth):
    rows = [json.loads(line) for line in (synth / "data.jsonl").read_text().splitlines()][:6]
    rows[1]["image"] = "images/missing.png"
    rows[2]["conversations"][0]["value"] = "<image>\n<image>\nwhat colour is the background ?"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[3]["image"] = str(tmp_path / "broken.png")
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    # broken.png lies outside image_root (absolute path): allowed explicitly since images are confined to it.
    recipe = write_recipe(tmp_path, synth, data={"datasets": [{"path": str(data), "image_root": str(synth)}],
                                                 "on_error": "raise", "allow_outside_image_root": True})
    trainer = Trainer(load_recipe(recipe))
    dataset = trainer.datasets[0]
    with pytest.raises(DataError, match=r"bad\.jsonl\[1\]: image .*missing\.png not found"):
        dataset.encode(1)
    with pytest.raises(DataError, match=r"bad\.jsonl\[2\]: 2 <image> / 0 <video> placeholders but 1 images"):
        dataset.encode(2)
    with pytest.raises(DataError, match=r"bad\.jsonl\[3\]: image .*broken\.png is corrupt"):
        dataset.encode(3)
    dataset.max_length = 10
    with pytest.raises(DataError, match=r"bad\.jsonl\[0\]: \d+ tokens is longer than max_length=10"):
        dataset.encode(0)
    dataset.max_length, dataset.on_error = 2048, "skip"
    assert dataset[1]["index"] == 4  # 1, 2, 3 are broken: the next good sample stands in


def test_bad_recipes_name_the_key(tmp_path, synth):
    path = write_recipe(tmp_path, synth)
    data = yaml.safe_load(path.read_text())
    data["optim"]["learning_rate"] = 1.0
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: unknown key 'optim\.learning_rate'"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="training.mode must be one of"):
        load_recipe(write_recipe(tmp_path, synth), ["training.mode=turbo"])
    with pytest.raises(ConfigError, match="format must be one of"):
        load_recipe(write_recipe(tmp_path, synth, data={"datasets": [{"path": "x", "format": "python:os.system"}]}))


def test_pseudo_labels_follow_the_paper_rules():
    from visorlib.config import VisorConfig
    from visorlib.train.router import select_labels
    from visorlib.visor import LayerPlan

    plan = LayerPlan(8, VisorConfig(sa_layers=[1, 3, 5], configurations=[[1], [1, 3], [1, 5], [1, 3, 5]]))

    def row(dataset, index, config, correct, matched, loss):
        return {"dataset": dataset, "index": index, "configuration": config, "correct": correct,
                "matched": matched, "loss": loss}

    rows = []
    for i in range(100):  # "docs": the full model gets 100 %, [1, 3] 99 %, [1, 5] 99 % with lower loss, [1] 50 %
        rows += [row("docs", i, [1, 3, 5], True, 3, 0.1), row("docs", i, [1, 3], i != 0, 3, 0.3),
                 row("docs", i, [1, 5], i != 1, 3, 0.2), row("docs", i, [1], i % 2 == 0, 1, 0.9)]
    for i in range(10):  # "easy": everything right; the fewest layers win
        rows += [row("easy", i, c, True, 2, 0.5 - 0.1 * len(c)) for c in plan.configurations]
    labels = select_labels(rows, plan, "dataset")
    assert labels[("docs", 7)] == [1, 5]  # >= 99 % of full, then fewest layers, then lowest loss
    assert labels[("easy", 3)] == [1]
    # Appendix D oracle: the longest correct prefix per sample, then fewest layers, then loss.
    oracle = select_labels(rows + [row("one", 0, [1, 3, 5], False, 2, 0.1), row("one", 0, [1, 3], False, 2, 0.2),
                                   row("one", 0, [1], False, 0, 0.0), row("one", 0, [1, 5], False, 1, 0.0)],
                           plan, "sample")
    assert oracle[("one", 0)] == [1, 3] and oracle[("docs", 0)] == [1, 5]
    with pytest.raises(ValueError, match="label mode"):
        select_labels(rows, plan, "vibes")
