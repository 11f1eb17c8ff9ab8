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


def test_large_weights_are_sharded_and_a_resave_leaves_no_stale_file(tmp_path):
    """Shards cut by huggingface_hub's rule, each written atomically; the files of the previous
    layout (single file -> shards -> fewer shards -> single file) are gone after each save."""
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and index["metadata"]["total_size"] > 0
    on_disk = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert on_disk == shards and "model.safetensors" not in on_disk
    assert set(index["weight_map"]) == set(load_file(tmp_path / shards[0])) | {
        k for name in shards[1:] for k in load_file(tmp_path / name)}
    assert torch.equal(text_logits(visorlib.from_pretrained(tmp_path)), text_logits(model))
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    fewer = sorted(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(fewer) < len(shards) and sorted(p.name for p in tmp_path.glob("*.safetensors")) == fewer
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "visorlib.json"]
    assert torch.equal(text_logits(visorlib.from_pretrained(tmp_path)), text_logits(model))


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


# -- checks added for issue 8: nothing a checkpoint holds is followed or misread silently ----------


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("version, message", [(99, "version 99 is newer than this visorlib reads"),
                                              ("1", "version must be a positive integer"),
                                              (0, "version must be a positive integer")])
def test_visorlib_json_version_is_checked(tmp_path, version, message):
    tiny_model().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "visorlib.json").read_text())
    _write_json(tmp_path / "visorlib.json", {**meta, "version": version})
    with pytest.raises(CheckpointError, match=message) as err:
        visorlib.from_pretrained(tmp_path)
    assert "visorlib.json" in str(err.value)
    # The card's architecture with these weights reads the same file.
    with pytest.raises(CheckpointError, match=message):
        visorlib.build("llava-ov-0.5b", pretrained=tmp_path, **_tiny_overrides())


def _tiny_overrides():
    tiny = visorlib.get_config("llava-ov-0.5b").tiny().to_dict()
    return {key: tiny[key] for key in ("vision", "decoder", "tokens")}


def test_a_file_without_version_is_format_1(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "visorlib.json").read_text())
    del meta["version"]
    _write_json(tmp_path / "visorlib.json", meta)
    assert torch.equal(text_logits(visorlib.from_pretrained(tmp_path)), text_logits(model))


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_sharded_index_must_stay_inside_the_folder(tmp_path, shard):
    folder = tmp_path / "ckpt"
    tiny_model().save_pretrained(folder)
    (tmp_path / "other").mkdir()
    (folder / "model.safetensors").rename(tmp_path / "other" / "model.safetensors")
    keys = load_file(tmp_path / "other" / "model.safetensors")
    _write_json(folder / "model.safetensors.index.json", {"weight_map": dict.fromkeys(keys, shard)})
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as err:
        visorlib.from_pretrained(folder)
    assert "model.safetensors.index.json" in str(err.value) and repr(shard) in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_tensor_for_a_float_weight_is_named(tmp_path, dtype):
    tiny_model().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    key = "decoder.layers.1.mlp.up_proj.weight"
    state[key] = torch.ones_like(state[key], dtype=dtype)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=rf"{key} in .*model\.safetensors holds (integer|bool) values"):
        visorlib.from_pretrained(tmp_path)


def test_integer_tensor_in_a_hf_checkpoint_names_the_shard(tmp_path):
    hf = tiny_hf_model(tied=False)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    hf_key = "model.language_model.layers.0.mlp.up_proj.weight"
    hf_key = hf_key if hf_key in index else next(k for k in index if k.endswith("layers.0.mlp.up_proj.weight"))
    shard = tmp_path / index[hf_key]
    state = load_file(shard)
    state[hf_key] = state[hf_key].to(torch.int32)
    save_file(state, shard)
    with pytest.raises(CheckpointError, match=rf"decoder\.layers\.0\.mlp\.up_proj\.weight in .*{shard.name} holds integer"):
        visorlib.from_pretrained(tmp_path)


@pytest.mark.parametrize("where", ["text_config", "top"])
def test_yarn_rope_scaling_is_refused_not_read_as_plain_rope(tmp_path, where):
    from hf_oracle import tiny_hf_config

    hf = tiny_hf_config().to_dict()
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    hf["text_config"]["rope_scaling"] = yarn
    _write_json(tmp_path / "config.json", hf)
    with pytest.raises(visorlib.ConfigError, match=r"config\.json: text_config\.rope_scaling type 'yarn' is not supported"):
        visorlib.from_pretrained(tmp_path)
    # Qwen2-VL: the 4.x layout keeps rope_scaling at the top level, 5.x inside text_config.
    qwen = {"model_type": "qwen2_vl", "text_config": {"rope_scaling": yarn}} if where == "text_config" else \
        {"model_type": "qwen2_vl", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    _write_json(tmp_path / "config.json", qwen)
    with pytest.raises(visorlib.ConfigError, match=r"config\.json: .*rope_scaling type 'yarn' is not supported"):
        visorlib.from_pretrained(tmp_path)


def test_bad_sizes_in_a_hf_config_name_the_file(tmp_path):
    from hf_oracle import tiny_hf_config

    hf = tiny_hf_config().to_dict()
    hf["text_config"]["num_key_value_heads"] = 3
    _write_json(tmp_path / "config.json", hf)
    with pytest.raises(visorlib.ConfigError, match=r"config\.json: decoder\.num_heads=4 must be divisible by decoder\.num_kv_heads=3"):
        visorlib.from_pretrained(tmp_path)


# -- tokenizers: saved with the model, corrupt ones named, mistyped paths never sent to the Hub ---------


def _with_tokenizer(folder):
    from visor_helpers import word_tokenizer

    model = tiny_model()
    model.save_pretrained(folder)
    word_tokenizer(folder, model.cfg)
    return visorlib.from_pretrained(folder)


def test_corrupt_tokenizer_json_is_a_checkpoint_error_naming_the_file(tmp_path):
    model = _with_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid tokenizer\.json") as err:
        visorlib.processor_for(model)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        visorlib.processing.Tokenizer.from_pretrained(tmp_path)


def test_save_pretrained_keeps_the_tokenizer_of_the_loaded_folder(tmp_path):
    loaded = _with_tokenizer(tmp_path / "a")
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (tmp_path / "b" / "tokenizer_config.json").exists() and not (tmp_path / "b" / "README.md").exists()
    again = visorlib.from_pretrained(tmp_path / "b")
    ids = visorlib.processor_for(again).tokenizer.encode("what is this ?")
    assert ids == visorlib.processor_for(loaded).tokenizer.encode("what is this ?")


def test_save_pretrained_with_an_explicit_tokenizer_and_model_card(tmp_path):
    loaded = _with_tokenizer(tmp_path / "a")
    processor = visorlib.processor_for(loaded)
    fresh = tiny_model(seed=3)  # random weights: no folder, so no tokenizer unless one is passed
    fresh.save_pretrained(tmp_path / "none")
    assert not (tmp_path / "none" / "tokenizer.json").exists()
    fresh.save_pretrained(tmp_path / "b", tokenizer=processor, model_card=True, repo_id="me/tiny-visor")
    tokenizer = visorlib.processing.Tokenizer.from_pretrained(tmp_path / "b")
    assert tokenizer.encode("what is this ?") == processor.tokenizer.encode("what is this ?")
    assert tokenizer.pad_token == processor.tokenizer.pad_token
    card = (tmp_path / "b" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: visorlib") and 'from_pretrained("me/tiny-visor")' in card
    assert f"{sum(p.numel() for p in fresh.parameters()) / 1e6:.1f} M parameters" in card and "`tokenizer.json`" in card


def test_mistyped_local_tokenizer_path_fails_at_once(tmp_path, monkeypatch):
    model = tiny_model()
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for value in ("runs/tokenizr", "./tok", str(tmp_path / "absent"), "tok.json", "tokdir"):
        with pytest.raises(FileNotFoundError, match=rf"tokenizer_source={value!r}: no tokenizer file or folder"):
            visorlib.processor_for(model, tokenizer_source=value)


def _offline_free_env(tmp_path):
    """An environment where the Hub is 'online' but unreachable (a closed local port), with an empty cache."""
    return dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "cache"),
                HF_TOKEN="hf_not_a_real_token", OMP_NUM_THREADS="1")


def test_processor_for_a_saved_folder_without_tokenizer_does_not_wait_on_the_hub(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    script = (
        "import time, warnings, visorlib\n"
        f"m = visorlib.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
        "t = time.perf_counter()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    p = visorlib.processor_for(m)\n"
        "print(time.perf_counter() - t, p.tokenizer is None, 'has no tokenizer.json' in str(w[0].message))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=_offline_free_env(tmp_path), capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    assert float(out[0]) < 2.0 and out[1:] == ["True", "True"]


def test_push_to_hub_without_network_names_the_hub_and_repo(tmp_path):
    script = (
        "import visorlib\n"
        "m = visorlib.zoo.instantiate(visorlib.get_config('llava-ov-0.5b').tiny())\n"
        "try:\n    m.push_to_hub('someone/tiny-visor')\n"
        "except visorlib.CheckpointError as err:\n    print('ERR', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=_offline_free_env(tmp_path), capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert out.startswith("ERR could not push to the Hugging Face Hub repo 'someone/tiny-visor' at http://127.0.0.1:9")


def test_mistyped_local_checkpoint_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'runs/ckpt' is neither an existing folder .*runs/ is a local folder"):
        visorlib.from_pretrained("runs/ckpt")
    for value in ("./ckpt", "ckpt", "a/b/c"):
        with pytest.raises(CheckpointError, match="is neither an existing folder nor a Hugging Face repo id"):
            visorlib.from_pretrained(value)


# -- checkpoints saved before the family-folder restructure (tests/fixtures/old-layout/README.md) ---------------

OLD_LAYOUT = Path(__file__).parent / "fixtures" / "old-layout"
OLD_LAYOUT_FAMILIES = sorted(p.name for p in OLD_LAYOUT.iterdir() if p.is_dir())


def test_old_layout_fixtures_are_all_there():
    # The three families that existed before the restructure; a lost folder must not go unnoticed.
    assert OLD_LAYOUT_FAMILIES == ["fast_vlm", "llava_onevision", "qwen2_vl"]


@pytest.mark.parametrize("family", OLD_LAYOUT_FAMILIES)
def test_checkpoint_saved_before_the_restructure_loads_and_reproduces_its_logits(family):
    folder = OLD_LAYOUT / family
    model = visorlib.from_pretrained(folder, dtype=torch.float32)
    assert model.cfg.family == family
    # State-dict names unchanged: every saved tensor lands, bit for bit, on a parameter or buffer
    # of the same name, and nothing but a tied LM head is left without one.
    saved, state = load_file(folder / "model.safetensors"), model.state_dict()
    assert set(state) - set(saved) <= {"decoder.lm_head.weight"} and set(saved) <= set(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key
    expected = load_file(folder / "expected.safetensors")
    logits = expected.pop("logits")
    with torch.no_grad():
        got = model(**expected, sa_layers=[[1], [1, 2, 4]]).logits
    # Bit-equal on the machine and thread count that wrote the fixture; another thread count sums
    # in another order (~1e-7), so the check is float32 rounding, not a behaviour change.
    torch.testing.assert_close(got, logits, atol=1e-6, rtol=1e-6)
