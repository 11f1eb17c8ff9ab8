"""The zoo registry: cards, strict validation, real-size architecture, every model runs."""

from __future__ import annotations

import pytest
import torch
import yaml

import visorlib
from visorlib.config import ConfigError, ModelConfig
from visorlib.processing import anyres

# The real Hub configs' architecture values (llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf),
# used to build transformers' reference model on the meta device.
REAL = {
    "llava-ov-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=152000, tie_word_embeddings=True),
    "llava-ov-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152128, tie_word_embeddings=False),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_list_models():
    names = visorlib.list_models()
    assert {"llava-ov-0.5b", "llava-ov-7b"} <= set(names)
    assert visorlib.list_models("*7b") == [n for n in names if n.endswith("7b")]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_parameter_count_matches_transformers(name):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text = dict(model_type="qwen2", rope_theta=1e6, **REAL[name])
    hf_cfg = LlavaOnevisionConfig(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384, intermediate_size=4304,
                           num_attention_heads=16, num_hidden_layers=26, patch_size=14, vision_use_head=False),
        tie_word_embeddings=REAL[name]["tie_word_embeddings"],
    )
    with torch.device("meta"):
        hf = LlavaOnevisionForConditionalGeneration(hf_cfg)
    ours = visorlib.build(name, device="meta")
    # transformers counts a tied head once, like visorlib (which has no separate lm_head then).
    assert count(ours) == count(hf)
    assert all(p.is_meta for p in ours.parameters())


def test_card_geometry_matches_design_facts():
    cfg = visorlib.get_config("llava-ov-0.5b")
    pins = cfg.processing.pinpoints(cfg.vision.image_size)
    args = (pins, cfg.vision.image_size, cfg.vision.grid_size, cfg.processing.max_tiles)
    assert cfg.vision.tokens_per_tile == 729
    assert anyres.num_image_tokens((1000, 1000), *args) == 7371
    assert anyres.num_image_tokens((899, 1024), *args) == 6551
    assert anyres.num_image_tokens((384, 384), *args) == 1485
    assert anyres.num_video_tokens(8, cfg.vision.grid_size) == 8 * 196 + 1


@pytest.mark.parametrize("name", visorlib.list_models())
def test_every_registered_model_runs_forward_and_backward(name):
    from PIL import Image

    from visorlib.models import family_of

    cfg = visorlib.get_config(name).tiny()
    model = visorlib.zoo.instantiate(cfg).train()
    # The family's own processor makes the inputs, so every backbone (tiling, padding...) is fed right.
    noise = Image.fromarray(torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8).numpy())
    ids, vision, _ = family_of(cfg).processor(cfg, None).profile_inputs(noise, n_text=7)
    routed = cfg.visor is not None and cfg.visor.router
    if routed:
        ids = torch.cat([ids, torch.tensor([[cfg.visor.routing_token_id]])], 1)
    labels = ids.masked_fill(ids == cfg.tokens.image_token_id, -100)
    out = model(ids, **vision, labels=labels, sa_layers="router" if routed else None)
    assert out.logits.shape == (1, ids.shape[1], cfg.decoder.vocab_size)
    loss = out.loss
    if routed:  # the router learns from its own cross-entropy (pseudo-labels), not from the LM loss
        loss = loss + torch.nn.functional.cross_entropy(out.router_logits, torch.zeros(1, dtype=torch.long))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("vision_tower."))


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model 'llava-ov-05b'.*did you mean"):
        visorlib.build("llava-ov-05b")


def test_unknown_and_mistyped_card_keys(tmp_path, monkeypatch):
    card = yaml.safe_load(open(visorlib.zoo.zoo_dir() / "llava-ov-0.5b.yaml"))
    card["decoder"]["num_layer"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'decoder\.num_layer'"):
        ModelConfig.from_yaml(path)
    del card["decoder"]["num_layer"]
    card["decoder"]["num_layers"] = "24"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'decoder\.num_layers' must be int"):
        ModelConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="unknown key 'decoder.layers'"):
        visorlib.build("llava-ov-0.5b", device="meta", decoder={"layers": 2})


def test_cards_are_loaded_with_safe_yaml(tmp_path, monkeypatch):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    monkeypatch.setenv("VISORLIB_ZOO", str(tmp_path))
    visorlib.zoo._cards.cache_clear()
    try:
        with pytest.raises(ConfigError, match="not valid YAML"):
            visorlib.get_config("evil")
    finally:
        visorlib.zoo._cards.cache_clear()


def test_overrides_build_a_smaller_model():
    model = visorlib.build("llava-ov-0.5b", device="meta", decoder={"num_layers": 2})
    assert len(model.decoder.layers) == 2


@pytest.mark.parametrize("section, changes, message", [
    ("decoder", {"num_heads": 0}, "decoder.num_heads must be positive, got 0"),
    ("decoder", {"num_layers": -2}, "decoder.num_layers must be positive, got -2"),
    ("decoder", {"num_kv_heads": 3}, "decoder.num_heads=14 must be divisible by decoder.num_kv_heads=3"),
    ("decoder", {"hidden_size": 900}, "decoder.hidden_size=900 must be divisible by decoder.num_heads=14"),
    ("decoder", {"rms_norm_eps": 0}, "decoder.rms_norm_eps must be positive"),
    ("decoder", {"mrope_section": [8, 12, 13]}, "decoder.mrope_section .* summing to head_dim / 2 = 32"),
    ("vision", {"num_heads": 0}, "vision.num_heads must be positive, got 0"),
    ("vision", {"hidden_size": 1000}, "vision.hidden_size=1000 must be divisible by vision.num_heads=16"),
    ("vision", {"image_size": 10}, "vision.image_size=10 must be at least vision.patch_size=14"),
])
def test_card_sizes_are_validated_at_load(tmp_path, section, changes, message):
    card = yaml.safe_load(open(visorlib.zoo.zoo_dir() / "llava-ov-0.5b.yaml"))
    card[section].update(changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match=rf"bad\.yaml: {message}"):
        ModelConfig.from_yaml(path)
    # The same rule for build()'s overrides and for a card that overrides a base card.
    with pytest.raises(ConfigError, match=message):
        visorlib.build("llava-ov-0.5b", device="meta", **{section: changes})


def test_a_card_overriding_its_base_with_zero_heads_is_named(tmp_path, monkeypatch):
    for name in ("llava-ov-0.5b",):
        (tmp_path / f"{name}.yaml").write_text((visorlib.zoo.zoo_dir() / f"{name}.yaml").read_text())
    (tmp_path / "mine.yaml").write_text("name: mine\nbase: llava-ov-0.5b\ndecoder: {num_heads: 0}\n")
    monkeypatch.setenv("VISORLIB_ZOO", str(tmp_path))
    visorlib.zoo._cards.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"mine\.yaml: decoder\.num_heads must be positive, got 0"):
            visorlib.get_config("mine")
    finally:
        visorlib.zoo._cards.cache_clear()


def test_every_shipped_card_and_its_tiny_variant_pass_the_size_checks():
    for name in visorlib.list_models():
        cfg = visorlib.get_config(name)
        assert cfg.decoder.num_heads % cfg.decoder.num_kv_heads == 0
        cfg.tiny()
