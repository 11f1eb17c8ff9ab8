"""Checkpoint I/O: round trips, Hugging Face variants, corrupt files, the Hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_oracle import save_hf, tiny_hf_model
from safetensors.torch import load_file, save_file

import visorlib
from visorlib.hub import CheckpointError


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return visorlib.zoo.instantiate(cfg).eval()


def text_logits(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randint(0, 240, (2, 9))).logits


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_round_trip_exactly(tmp_path, tied):
    model = tiny_model(decoder={"tie_word_embeddings": tied})
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "visorlib.json").read_text())["format"] == "visorlib"
    loaded = visorlib.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=False):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(text_logits(model), text_logits(loaded))
    assert ("decoder.lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tied


def test_build_with_local_pretrained_folder(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    card = visorlib.get_config("llava-ov-0.5b").tiny()
    rebuilt = visorlib.zoo.instantiate(card, "meta")
    visorlib.zoo.load_weights(rebuilt, tmp_path)
    assert torch.equal(text_logits(model), text_logits(rebuilt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hf_checkpoint(tmp_path, dtype):
    hf = tiny_hf_model(tied=False).to(dtype)
    folder = save_hf(hf, tmp_path)
    ours = visorlib.from_pretrained(folder)
    assert ours.decoder.embed_tokens.weight.dtype == torch.float32
    expected = hf.model.language_model.embed_tokens.weight.float()
    assert torch.equal(ours.decoder.embed_tokens.weight, expected)
    ours_half = visorlib.from_pretrained(folder, dtype=dtype)
    assert ours_half.decoder.embed_tokens.weight.dtype == dtype


def test_sharded_hf_checkpoint(tmp_path):
    hf = tiny_hf_model(tied=False)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = visorlib.from_pretrained(tmp_path)
    torch.testing.assert_close(ours.decoder.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    del state["decoder.layers.1.mlp.up_proj.weight"]
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"missing keys \[decoder\.layers\.1\.mlp\.up_proj\.weight\]"):
        visorlib.from_pretrained(tmp_path)
    state["decoder.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    state["decoder.extra.weight"] = torch.zeros(3)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[decoder\.extra\.weight\]"):
        visorlib.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    card = visorlib.get_config("llava-ov-0.5b").tiny().with_overrides({"decoder": {"intermediate_size": 128}})
    model = visorlib.zoo.instantiate(card, "meta")
    with pytest.raises(CheckpointError, match="mlp.*checkpoint shape"):
        visorlib.zoo.load_weights(model, tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        visorlib.from_pretrained(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "visorlib.json").write_text(json.dumps({"format": "visorlib", "config": {}}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are not loaded"):
        visorlib.from_pretrained(tmp_path)


def test_bad_configs_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        visorlib.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(visorlib.ConfigError, match="model_type 'mllama' is not supported"):
        visorlib.from_pretrained(tmp_path)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = tiny_model(seed=1)
    old.save_pretrained(tmp_path)
    new = tiny_model(seed=2)

    def crash(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr("visorlib.hub.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "visorlib.json"]
    assert torch.equal(text_logits(visorlib.from_pretrained(tmp_path)), text_logits(old))


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """Lay out ``source`` as huggingface_hub's cache would hold a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_id_is_served_from_the_offline_cache(tmp_path):
    hf = tiny_hf_model(tied=True)
    save_hf(hf, tmp_path / "src")
    fake_hub_cache(tmp_path / "cache", "visor-test/tiny-llava-ov", tmp_path / "src")
    script = (
        "import torch, visorlib;"
        "m = visorlib.from_pretrained('visor-test/tiny-llava-ov');"
        "print(m.decoder.embed_tokens.weight.sum().item());"
        "\ntry:\n visorlib.from_pretrained('visor-test/absent')\nexcept visorlib.CheckpointError as e: print('ERR', e)"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    total, err = out.strip().splitlines()
    assert float(total) == pytest.approx(hf.model.language_model.embed_tokens.weight.sum().item(), abs=1e-3)
    assert "visor-test/absent" in err and "HF_HUB_OFFLINE=1" in err
