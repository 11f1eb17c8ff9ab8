"""VISOR invariants (paper eq. 2-3): dense equivalence, what sees the image, per-sample configurations."""

from __future__ import annotations

import copy

import pytest
import torch
from visor_helpers import CASES, batch, build, sample, tiny_cfg

import visorlib
from visorlib.config import ConfigError, VisorConfig


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    """The model family under test: every invariant below must hold for each backbone."""
    return request.param


def text_positions(case, model, inputs):
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    return mask & ~case.visual_mask(model, inputs)


def test_all_self_attention_plan_is_the_dense_model(case):
    dense = build(case.tiny_cfg(sa_layers=None))
    visor = visorlib.visorize(copy.deepcopy(dense), {"sa_layers": list(range(6))}, warn=False)
    inputs = case.batch(dense, [case.sample(dense, 0, routing=False), case.sample(dense, 1, routing=False, seed=1)])
    with torch.no_grad():
        expected, got = dense(**inputs).logits, visor(**inputs).logits
    text = text_positions(case, dense, inputs)
    assert torch.equal(got[text], expected[text])
    assert (got[~text & inputs["attention_mask"].bool()] == 0).all()  # visual positions predict nothing


def test_text_ignores_the_image_without_cross_or_self_attention(case):
    model = build(case.tiny_cfg(ca_layers=[], router=False, configurations=[]))
    inputs = case.batch(model, [case.sample(model, 0, routing=False)])
    other = case.other_pixels(inputs)
    text = text_positions(case, model, inputs)
    with torch.no_grad():
        a, b = model(**inputs, sa_layers=[]).logits, model(**other, sa_layers=[]).logits
        assert torch.equal(a[text], b[text])
        assert not torch.allclose(model(**inputs).logits[text], model(**other).logits[text])
    with_ca = build(case.tiny_cfg(router=False))
    with torch.no_grad():
        a, b = with_ca(**inputs, sa_layers=[]).logits, with_ca(**other, sa_layers=[]).logits
    after_image = text & (torch.arange(text.shape[1]) > int(text.logical_not().nonzero()[:, 1].max()))
    assert not torch.allclose(a[after_image], b[after_image])
    before_image = text & (torch.arange(text.shape[1]) < int(text.logical_not().nonzero()[:, 1].min()))
    assert torch.equal(a[before_image], b[before_image])  # no earlier image: a zero update, never NaN


def decoder_states(case, model, inputs, stop_after, sa_layers):
    ids = inputs["input_ids"]
    embeds, visual, segments, positions = case.embed(model, inputs)
    mask = torch.ones_like(ids)
    lm = model.language_model
    executor = lm.executor()
    with torch.no_grad():  # the first ``stop_after + 1`` layers of the executor, then the merged states
        state = executor.start(embeds, positions, mask, visual, segments)
        executor.run_layers(state, lm.request(sa_layers, 1).mask(lm.plan.num_layers), range(stop_after + 1))
        hidden = state.merged()
    return hidden, visual, embeds, positions


def test_visual_tokens_change_only_in_executed_self_attention_layers(case):
    model = build(case.tiny_cfg(router=False))
    inputs = case.row_inputs(case.batch(model, [case.sample(model, 0, routing=False)]), 0, model)
    h0, visual, embeds, positions = decoder_states(case, model, inputs, 0, [1, 4])  # layer 0: cross-attention
    h1, *_ = decoder_states(case, model, inputs, 1, [1, 4])  # layer 1: executed SA
    h2, *_ = decoder_states(case, model, inputs, 2, [1, 4])  # layer 2: skipped SA
    h3, *_ = decoder_states(case, model, inputs, 3, [1, 4])  # layer 3: cross-attention
    assert torch.equal(h0[visual], embeds[visual])
    assert not torch.allclose(h1[visual], h0[visual])
    assert torch.equal(h2[visual], h1[visual]) and torch.equal(h3[visual], h1[visual])
    # The executed layer is exactly the dense decoder layer over [visual; text].
    with torch.no_grad():
        dense_layer = model.decoder.layers[1](h0, model.decoder.rotary(positions, h0.dtype), None)
    assert torch.equal(h1, dense_layer)


@pytest.mark.parametrize("configs", [[[1], [1, 2, 4], [1, 4]], [[1, 2], [1, 2], [1]]])
def test_per_sample_configurations_equal_each_sample_alone(case, configs):
    model = build(case.tiny_cfg())
    rows = [case.sample(model, 0, seed=1), case.sample(model, 1, seed=2), case.sample(model, 2, seed=3)]
    inputs = case.batch(model, rows)
    with torch.no_grad():
        together = model(**inputs, sa_layers=configs)
        generated = model.generate(**inputs, sa_layers=configs, max_new_tokens=6, eos_token_id=[])
    assert together.sa_layers == configs
    for i, config in enumerate(configs):
        alone_inputs = case.row_inputs(inputs, i, model)
        keep = inputs["attention_mask"][i].bool()
        with torch.no_grad():
            alone = model(**alone_inputs, sa_layers=config).logits[0]
            alone_gen = model.generate(**alone_inputs, sa_layers=config, max_new_tokens=6, eos_token_id=[])
        torch.testing.assert_close(together.logits[i][keep], alone, atol=1e-5, rtol=0)
        assert torch.equal(generated[i, -6:], alone_gen[0, -6:])


@pytest.mark.parametrize("config", [[1], [1, 2], [1, 4], [1, 2, 4]])
def test_cached_generation_equals_recomputing(case, config):
    model = build(case.tiny_cfg(), seed=5)
    inputs = case.batch(model, [case.sample(model, 0, seed=4), case.sample(model, 1, seed=6)])
    steps = 6
    got = model.generate(**inputs, sa_layers=config, max_new_tokens=steps, eos_token_id=[])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, mask, **vision, sa_layers=config).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(got, ids)


@pytest.mark.parametrize("visor", [{"sa_layers": None}, {}], ids=["dense", "visor"])
def test_decoding_one_unpadded_sample_equals_recomputing(case, visor):
    # Without padding there is no attention mask: the prefill filling the cache must still be causal.
    model = build(case.tiny_cfg(**visor), seed=5)
    inputs = case.row_inputs(case.batch(model, [case.sample(model, 0, seed=4, routing=False)]), 0, model)
    ids, step, config = inputs["input_ids"], torch.tensor([[7]]), None if model.plan.dense else [1, 4]
    cache = model.new_cache()
    with torch.no_grad():
        model(**inputs, cache=cache, logits_to_keep=1, sa_layers=config)
        decoded = model(step, torch.ones(1, ids.shape[1] + 1, dtype=torch.long), cache=cache).logits[0, -1]
        recomputed = model(**dict(inputs, input_ids=torch.cat([ids, step], 1)), sa_layers=config)
    torch.testing.assert_close(decoded, recomputed.logits[0, -1], atol=1e-5, rtol=0)


def test_cross_attention_keys_are_projected_once(case):
    model = build(case.tiny_cfg())
    inputs = case.batch(model, [case.sample(model, 0)])
    cache = model.new_cache()
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = model(**inputs, cache=cache, sa_layers=[1, 4], logits_to_keep=1)
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(nxt, mask, cache=cache)
    assert cache.cross_projections == len(model.plan.ca_layers) == 2
    n_visual = int(case.visual_mask(model, inputs).sum())
    n_text = inputs["input_ids"].shape[1] - n_visual + 4
    report = visorlib.flops(model, n_visual=n_visual, n_text=n_text, sa_layers=[1, 4])
    # fp32 cache: 4 bytes per value instead of the report's bf16 2 bytes.
    assert cache.nbytes_per_sample() == [2 * report.kv_cache_bytes]


def test_router_decides_and_a_forced_configuration_overrides_it(case):
    model = build(case.tiny_cfg(), seed=2)
    inputs = case.batch(model, [case.sample(model, 0, seed=1), case.sample(model, 1, seed=2)])
    with torch.no_grad():
        routed = model(**inputs, sa_layers="router")
        forced = model(**inputs, sa_layers=[1, 2])
    assert all(c in model.plan.configurations for c in routed.sa_layers)
    assert routed.router_logits.shape == (2, len(model.plan.configurations))
    picks = [model.plan.configurations[i] for i in routed.router_logits.argmax(-1).tolist()]
    assert routed.sa_layers == picks
    assert forced.sa_layers == [[1, 2], [1, 2]] and forced.router_logits is None
    with torch.no_grad():
        same = model(**inputs, sa_layers=routed.sa_layers).logits
    torch.testing.assert_close(routed.logits, same, atol=1e-6, rtol=0)
    generated = model.generate(**inputs, sa_layers="router", max_new_tokens=4, eos_token_id=[])
    assert torch.equal(generated, model.generate(**inputs, sa_layers=routed.sa_layers, max_new_tokens=4, eos_token_id=[]))


def test_several_questions_take_the_costliest_prediction():
    from visorlib.visor import route_configs

    plan = build(tiny_cfg()).plan
    logits = torch.full((3, 4), -5.0)
    logits[0, 0] = logits[1, 3] = logits[2, 1] = 5.0  # sample 0 asks for [1] and [1, 2, 4]; sample 1 for [1, 2]
    assert route_configs(plan, logits, torch.tensor([0, 0, 1]), 2) == [[1, 2, 4], [1, 2]]
    with pytest.raises(ValueError, match=r"samples \[2\] contain no routing token"):
        route_configs(plan, logits, torch.tensor([0, 0, 1]), 3)


def test_bad_configurations_are_clear_errors():
    model = build(tiny_cfg())
    inputs = batch(model, [sample(model)])
    with pytest.raises(ConfigError, match=r"layers \[3\] are not self-attention candidates"):
        model(**inputs, sa_layers=[1, 3])
    with pytest.raises(ConfigError, match=r"layers \[9\] are out of range"):
        model(**inputs, sa_layers=[1, 9])
    with pytest.raises(ValueError, match="gives 2 configurations for a batch of 1"):
        model(**inputs, sa_layers=[[1], [1, 2]])
    no_router = build(tiny_cfg(router=False))
    with pytest.raises(ValueError, match="has no router"):
        no_router(**inputs, sa_layers="router")
    with pytest.raises(ConfigError, match="packing_ratio must be >= 1"):
        tiny_cfg(packing_ratio=0.5) and visorlib.zoo.instantiate(tiny_cfg(packing_ratio=0.5), "meta")
    with pytest.raises(ConfigError, match="both cross-attention and self-attention"):
        visorlib.zoo.instantiate(tiny_cfg(ca_layers=[0, 1]), "meta")
    with pytest.raises(ConfigError, match="already has a VISOR plan"):
        visorlib.visorize(model, VisorConfig(sa_layers=[1]))


def test_visor_cards_follow_the_paper():
    cfg = visorlib.get_config("visor-llava-ov-0.5b")
    plan = visorlib.build("visor-llava-ov-0.5b", device="meta").plan
    assert plan.sa_layers == [1, 4, 7, 10, 13, 16, 19, 22] and len(plan.ca_layers) == 8
    assert len(plan.configurations) == 13 and plan.router_layer == 3
    assert cfg.decoder == visorlib.get_config("llava-ov-0.5b").decoder
    for name in ("visor-llava-ov-1.5b", "visor-llava-ov-7b"):
        plan = visorlib.build(name, device="meta").plan
        assert plan.num_layers == 28 and len(plan.ca_layers) == len(plan.sa_layers) == 9


def test_pretrained_dense_weights_plus_fresh_blocks_then_round_trip(tmp_path, monkeypatch):
    from hf_oracle import save_hf, tiny_hf_model

    hf = tiny_hf_model(tied=False, seed=7)
    save_hf(hf, tmp_path / "hf")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    dense = visorlib.from_pretrained(tmp_path / "hf")
    import yaml

    card = dense.cfg.to_dict() | {"name": "tiny-dense"}
    (zoo / "tiny-dense.yaml").write_text(yaml.safe_dump(card))
    (zoo / "tiny-visor.yaml").write_text(yaml.safe_dump(
        {"name": "tiny-visor", "base": "tiny-dense", "visor": {"ca_layers": [0], "sa_layers": [1, 2]}}))
    monkeypatch.setenv("VISORLIB_ZOO", str(zoo))
    visorlib.zoo._cards.cache_clear()
    try:
        with pytest.warns(UserWarning, match="dense weights of .*freshly initialised and untrained"):
            model = visorlib.build("tiny-visor", pretrained=tmp_path / "hf")
    finally:
        visorlib.zoo._cards.cache_clear()
    assert model.cfg.name == "tiny-visor" and model.plan.ca_layers == [0]
    assert torch.equal(model.decoder.layers[2].mlp.up_proj.weight, dense.decoder.layers[2].mlp.up_proj.weight)
    assert torch.equal(model.cross_attention["0"].q_proj.weight, model.decoder.layers[0].self_attn.q_proj.weight)
    model.save_pretrained(tmp_path / "visor")
    loaded = visorlib.from_pretrained(tmp_path / "visor")
    assert loaded.cfg == model.cfg
    inputs = batch(model, [sample(model, routing=False)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, sa_layers=[1]).logits, model(**inputs, sa_layers=[1]).logits)


def test_visorize_by_card_name_checks_the_plan_fits():
    dense = visorlib.build("llava-ov-0.5b", device="meta")
    with pytest.warns(UserWarning):
        model = visorlib.visorize(dense, "visor-llava-ov-0.5b")
    assert model.plan.describe() == "8CA-7SA"
    tiny = build(tiny_cfg(sa_layers=None))
    with pytest.raises(ConfigError, match="out of range"):
        visorlib.visorize(tiny, "visor-llava-ov-0.5b", warn=False)


def test_processor_places_a_routing_token_after_each_question(tmp_path):
    from PIL import Image
    from visor_helpers import ROUTING, word_tokenizer

    from visorlib.models.llava_onevision import LlavaOnevisionProcessor
    from visorlib.processing import Tokenizer

    model = build(tiny_cfg(), seed=3)
    word_tokenizer(tmp_path, model.cfg)
    processor = LlavaOnevisionProcessor(model.cfg, Tokenizer.from_file(tmp_path / "tokenizer.json"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "w1 w2"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is w3 ?"}]},
    ]
    inputs = processor.chat(messages, images=[Image.new("RGB", (90, 60), (30, 60, 90))])
    ids = inputs["input_ids"][0].tolist()
    im_end = processor.tokenizer.token_to_id("<|im_end|>")
    routes = [i for i, t in enumerate(ids) if t == ROUTING]
    assert len(routes) == 2 and all(ids[i + 1] == im_end for i in routes)
    with torch.no_grad():
        out = model(**inputs, sa_layers="router")
    assert out.router_logits.shape[0] == 2 and out.sa_layers[0] in model.plan.configurations
    plain = LlavaOnevisionProcessor(tiny_cfg(router=False), processor.tokenizer).chat(messages, images=[Image.new("RGB", (90, 60))])
    assert ROUTING not in plain["input_ids"][0].tolist()


def test_training_loss_skips_visual_positions_and_the_token_after_them():
    model = build(tiny_cfg(router=False))
    inputs = batch(model, [sample(model, routing=False)])
    ids = inputs["input_ids"]
    visual = ids == model.cfg.tokens.image_token_id
    first_after = int(visual[0].nonzero().max()) + 1
    labels = ids.clone()
    out = model(**inputs, labels=labels, sa_layers=[1])
    # Reference: cross-entropy over text targets whose previous position is text.
    logits = out.logits[0, :-1]
    targets = labels[0, 1:].clone()
    targets[visual[0, 1:] | visual[0, :-1]] = -100
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    assert torch.isclose(out.loss, expected) and targets[first_after - 1] == -100


def test_generation_never_emits_the_routing_token():
    model = build(tiny_cfg(), seed=1)
    with torch.no_grad():
        model.decoder.embed_tokens.weight[252] = 50.0  # make the routing id the argmax everywhere (tied head)
    out = model.generate(**batch(model, [sample(model)]), max_new_tokens=5, eos_token_id=[])
    assert 252 not in out[0, -5:].tolist()
