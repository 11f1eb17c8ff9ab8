"""visorlib.analysis: attention shares against transformers' eager attention, CKA properties,
layer drop as a plan-level request, the suggested plan and the ``analyze`` command."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hf_oracle import SPECS

import visorlib
from visorlib.analysis import (
    SOURCES,
    TokenGroups,
    analyze,
    cka_matrix,
    correlation,
    drop_request,
    easy_hard,
    linear_cka,
    load_samples,
    measure_batch,
    random_subsets,
    suggest_plan,
)
from visorlib.analysis.layer_drop import layer_drop_scores
from visorlib.cli import main

SPEC = {spec.family: spec for spec in SPECS}
ATOL = 1e-5


# -- attention shares against the eager oracle ----------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """``family -> (spec, transformers model, visorlib model with its default SDPA attention)``."""
    pytest.importorskip("transformers")
    built = {}

    def get(family):
        if family not in built:
            spec = SPEC[family]
            hf = spec.hf_model(True)
            folder = spec.save(hf, tmp_path_factory.mktemp(family))
            ours = visorlib.from_pretrained(folder)
            assert ours.cfg.attn_implementation == "sdpa"  # the probe must not need eager attention
            built[family] = spec, hf, ours
        return built[family]

    return get


def eager_shares(attentions, groups: TokenGroups) -> torch.Tensor:
    """``[B, layers, 2, 4]`` shares from materialised attention probabilities ``[B, H, L, L]`` per layer."""
    keys = groups.keys().double()  # [4, B, L]
    out = torch.full((keys.shape[1], len(attentions), 2, 4), float("nan"), dtype=torch.float64)
    for layer, att in enumerate(attentions):
        for b in range(att.shape[0]):
            probs = att[b].double().mean(0)  # mean over heads: [L, L]
            for s, name in enumerate(SOURCES):
                rows = getattr(groups, name)[b]
                if rows.any():
                    out[b, layer, s] = (probs[rows] @ keys[:, b].T).mean(0)
    return out


def with_answer(inputs, answer_tokens):
    """Mark each row's last ``answer_tokens + 1`` real positions but the last as answer-predicting."""
    ids = inputs["input_ids"]
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, -answer_tokens - 1:-1] = True
    return answer


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("batched", [False, True], ids=["one", "left-padded-batch"])
def test_shares_equal_transformers_eager_attention(oracle, family, batched):
    spec, hf, ours = oracle(family)
    g = torch.Generator().manual_seed(3)
    if batched:
        inputs, _ = spec.padded_batch(ours.cfg, g)
    else:
        inputs = spec.cases[next(c for c in spec.cases if c.startswith("image"))](ours.cfg, g)
    answer = with_answer(inputs, 3)
    probe = measure_batch(ours, inputs, answer, chunk=2)  # chunk 2: several softmax blocks per group
    extra = dict(spec.hf_extras(inputs))
    if batched and spec.hf_padding_positions:
        extra["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        attentions = hf(**inputs, **extra, output_attentions=True).attentions
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    groups = TokenGroups.build(ours.language_model.visual_token_mask(inputs["input_ids"]), mask, answer)
    expected = eager_shares(attentions, groups)
    torch.testing.assert_close(probe.shares, expected, atol=ATOL, rtol=0)
    # The shares are a distribution over four disjoint groups that cover every real token.
    assert ((probe.shares >= 0) & (probe.shares <= 1 + 1e-6)).all()
    torch.testing.assert_close(probe.shares.sum(-1), torch.ones_like(probe.shares[..., 0]), atol=1e-6, rtol=0)  # float32 softmax rows
    stacked = groups.keys().long()
    assert (stacked.sum(0) == mask).all()
    assert groups.query.any() and groups.answer.any() and groups.image.any()


def test_the_probe_leaves_the_forward_unchanged(oracle):
    _, _, ours = oracle("llava_onevision")
    inputs = SPEC["llava_onevision"].cases["image-wide-unpad"](ours.cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = ours(**inputs).logits
    probe = measure_batch(ours, inputs, with_answer(inputs, 2), keep_states=True)
    with torch.no_grad():
        again = ours(**inputs).logits
    assert torch.equal(plain, again) and ours.language_model.observer is None
    layers = ours.plan.num_layers
    assert len(probe.states) == layers + 1
    visual = int(ours.language_model.visual_token_mask(inputs["input_ids"]).sum())
    assert probe.states[0].shape[1] == visual


def tiny_visor():
    torch.manual_seed(0)
    cfg = visorlib.get_config("visor-llava-ov-0.5b").tiny()
    return visorlib.zoo.instantiate(cfg).eval()


def test_visor_text_only_layers_see_no_image_and_ca_layers_report_their_update():
    model = tiny_visor()
    inputs = SPEC["llava_onevision"].cases["image-wide-unpad"](model.cfg, torch.Generator().manual_seed(0))
    config = model.plan.configurations[0]
    probe = measure_batch(model, inputs, with_answer(inputs, 2), sa_layers=config, keep_states=True)
    for layer in range(model.plan.num_layers):
        image = probe.shares[0, layer, :, 0]
        if layer in config:
            assert (image > 0).all()
        else:
            assert (image == 0).all()  # text-only (and CA layers' decoder pass): visual keys masked
        update = probe.ca_update[0, layer]
        assert torch.isfinite(update).all() == (layer in model.plan.ca_layers)
    # Visual tokens change only at executed self-attention layers.
    for layer in range(model.plan.num_layers):
        same = torch.equal(probe.states[layer], probe.states[layer + 1])
        assert same == (layer not in config)


# -- CKA -------------------------------------------------------------------------------------------------------


def numpy_cka(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """Direct n x n implementation: appendix M's eq. (4), or Song et al.'s unbiased HSIC."""
    n = x.shape[0]
    k, l_ = x @ x.T, y @ y.T
    if not unbiased:
        h = np.eye(n) - np.ones((n, n)) / n
        kc, lc = h @ k @ h, h @ l_ @ h
        return float((kc * lc).sum() / np.linalg.norm(kc) / np.linalg.norm(lc))

    def hsic(a, b):
        a, b = a.copy(), b.copy()
        np.fill_diagonal(a, 0)
        np.fill_diagonal(b, 0)
        one = np.ones(n)
        return (np.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ a @ b @ one) / (n * (n - 3))

    return float(hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_)))


@pytest.mark.parametrize("estimator", ["paper", "unbiased"])
def test_cka_equals_a_direct_numpy_implementation(estimator):
    rng = np.random.default_rng(0)
    for n, d in ((40, 8), (12, 30)):
        x = rng.normal(size=(n, d))
        y = np.tanh(x @ rng.normal(size=(d, d))) + 0.3 * rng.normal(size=(n, d)) + 2.0  # offset: centring matters
        got = linear_cka(torch.tensor(x), torch.tensor(y), estimator)
        assert got == pytest.approx(numpy_cka(x, y, estimator == "unbiased"), abs=1e-10)


@pytest.mark.parametrize("estimator", ["paper", "unbiased"])
def test_cka_properties(estimator):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = x @ torch.randn(16, 16, generator=g, dtype=torch.float64) + torch.randn(50, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    base = linear_cka(x, y, estimator)
    assert linear_cka(x, x, estimator) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(y, x, estimator) == pytest.approx(base, abs=1e-12)                 # symmetric
    assert linear_cka(x @ q, y, estimator) == pytest.approx(base, abs=1e-10)             # orthogonal, either side
    assert linear_cka(x, y @ q, estimator) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, y, estimator) == pytest.approx(base, abs=1e-10)           # isotropic scaling
    assert linear_cka(x, 0.01 * y, estimator) == pytest.approx(base, abs=1e-10)
    states = torch.stack([x, y, x @ q, torch.randn(50, 16, generator=g, dtype=torch.float64)])
    full = cka_matrix(states, estimator, chunk=7)
    torch.testing.assert_close(full, full.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(full.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(full, cka_matrix(states, estimator, chunk=1000), atol=1e-12, rtol=0)  # chunking is exact


def test_cka_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="estimator"):
        cka_matrix(torch.randn(2, 5, 3), "biased")
    with pytest.raises(ValueError, match="at least 4 tokens"):
        cka_matrix(torch.randn(2, 3, 3), "unbiased")


# -- layer drop ------------------------------------------------------------------------------------------------


def text_only_forward(model, inputs):
    """The same prompt with its image removed, every text token at its original rotary position."""
    ids = inputs["input_ids"]
    keep = ~model.language_model.visual_token_mask(ids)[0]
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        return model(input_ids=ids[:, keep], position_ids=positions[:, keep]).logits


def test_dropping_every_layer_equals_a_text_only_forward():
    torch.manual_seed(0)
    model = visorlib.zoo.instantiate(visorlib.get_config("llava-ov-0.5b").tiny()).eval()
    inputs = SPEC["llava_onevision"].cases["image-wide-unpad"](model.cfg, torch.Generator().manual_seed(0))
    keep = ~model.language_model.visual_token_mask(inputs["input_ids"])[0]
    every = list(range(model.plan.num_layers))
    with torch.no_grad():
        dropped = model(**inputs, sa_layers=drop_request(model, every, 1)).logits[:, keep]
        plain = model(**inputs).logits
        none = model(**inputs, sa_layers=drop_request(model, [], 1)).logits
    torch.testing.assert_close(dropped, text_only_forward(model, inputs), atol=1e-5, rtol=0)
    assert torch.equal(none, plain)  # the empty subset is the unmodified model, bit for bit
    assert not torch.allclose(dropped, plain[:, keep], atol=1e-3)  # and dropping does something
    with pytest.raises(ValueError, match="cannot drop vision"):
        drop_request(tiny_visor(), [0], 1)  # a CA layer: part of the architecture, not the configuration


@pytest.fixture(scope="module")
def synthdoc(tmp_path_factory):
    """The shipped dense synthdoc model and a few held-out pages of its task."""
    from visorlib.train.synthdoc import make_synthdoc_dataset

    folder = tmp_path_factory.mktemp("synthdoc")
    cfg = visorlib.get_config("synthdoc-tiny")
    make_synthdoc_dataset(folder, cfg, pages_count=2, seed=20261299)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = visorlib.build("synthdoc-tiny", pretrained=True).eval()
    return folder, model, visorlib.processor_for(model)


def test_layer_drop_with_the_empty_subset_is_the_evaluation_accuracy(synthdoc, tmp_path):
    from visorlib.eval import evaluate
    from visorlib.eval.runner import encode_prompt

    folder, model, processor = synthdoc
    samples = load_samples([str(folder / "easy.jsonl"), str(folder / "hard.jsonl")], limit=4)
    encoded = [encode_prompt(processor, s.question, s.images()) for s in samples]
    scores = layer_drop_scores(model, processor, encoded, samples, [[], [0, 1, 2]], batch_size=3,
                               max_new_tokens=8, progress=False)
    report = evaluate(model, [str(folder / "easy.jsonl"), str(folder / "hard.jsonl")], limit=4, batch_size=3,
                      max_new_tokens=8, progress=False, processor=processor, predictions=tmp_path / "p.jsonl")
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    by_sample = {(r["dataset"], r["index"]): r["score"] for r in records}
    assert scores[0] == [by_sample[s.dataset, s.index] for s in samples]
    accuracy = sum(scores[0]) / len(scores[0])
    rows = [r for r in report.rows if r.category == "all"]
    assert 100 * accuracy == pytest.approx(sum(r.score * r.samples for r in rows) / sum(r.samples for r in rows))


def test_random_subsets_correlation_and_clusters():
    subsets = random_subsets([1, 3, 5], 20, seed=0)
    assert subsets[0] == [] and len(subsets) == 8  # every non-empty subset of 3 layers, once
    assert len({tuple(s) for s in subsets}) == 8
    assert random_subsets([1, 3, 5], 4, seed=0) == random_subsets([1, 3, 5], 4, seed=0)
    profiles = {"doc": [1.0, 0.2, 0.1, 0.5], "chart": [0.9, 0.3, 0.1, 0.4], "sqa": [0.8, 0.8, 0.79, 0.8],
                "pope": [0.9, 0.88, 0.9, 0.89]}
    corr = correlation(profiles)
    assert corr[0][0] == pytest.approx(1.0) and corr[0][1] > 0.9
    assert easy_hard(profiles) == {"doc": "hard", "chart": "hard", "sqa": "easy", "pope": "easy"}
    assert correlation({"flat": [1.0, 1.0], "x": [1.0, 0.0]})[0][1] is None
    robust = {"a": [1.0, 1.0, 0.97], "b": [1.0, 0.99, 1.0], "c": [0.9, 0.9, 0.88]}
    assert set(easy_hard(robust).values()) == {"easy"}  # no group is vision-sensitive


# -- the suggested plan and the command ------------------------------------------------------------------------


def test_suggested_plan_follows_attention_peaks_and_cka_stages():
    answer_image = [0.1, 0.05, 0.6, 0.1, 0.05, 0.5, 0.1, 0.4]
    states = 9
    stage = [0, 0, 0, 1, 1, 1, 1, 2, 2]  # the representation changes at the output of layers 2 and 6
    cka = [[1.0 if stage[i] == stage[j] else 0.5 for j in range(states)] for i in range(states)]
    plan = suggest_plan(answer_image, cka, 8)
    assert plan["sa_layers"] == [2, 6]
    assert plan["ca_layers"] == [5, 7]  # peaks at 2, 5, 7; layer 2 is already an SA candidate
    assert plan["configurations"] == [[], [2], [2, 6]]
    # A change in the states leaving the last layer is read by no layer: no SA candidate there.
    last = [[1.0 if (i == states - 1) == (j == states - 1) else 0.5 for j in range(states)] for i in range(states)]
    assert suggest_plan(answer_image, last, 8)["sa_layers"] == []


def test_the_analyze_command_writes_json_figures_and_a_plan_and_guards_its_folder(synthdoc, tmp_path, capsys):
    folder, _, _ = synthdoc
    out = tmp_path / "out"
    args = ["analyze", "synthdoc-tiny", "--data", str(folder / "easy.jsonl"), "--data", str(folder / "hard.jsonl"),
            "--limit", "2", "--out", str(out), "--drop-subsets", "2", "--suggest-plan", "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert set(report["attention"]) == {"easy", "hard"} and len(report["layer_drop"]["subsets"]) == 3
    assert {p.name for p in out.iterdir()} >= {"analysis.json", "plan.yaml", ".visorlib-analyze"}
    assert "visor:" in capsys.readouterr().out
    assert main(args) == 0  # its own outputs may be replaced
    (out / "cka.png").unlink(missing_ok=True)
    (out / "cka.png").write_text("a user's file")
    manifest = json.loads((out / ".visorlib-analyze").read_text())
    (out / ".visorlib-analyze").write_text(json.dumps([n for n in manifest if n != "cka.png"]))
    assert main(args) == 2
    assert "cka.png" in capsys.readouterr().err
    assert main(["analyze", "synthdoc-tiny", "--data", str(tmp_path / "missing.jsonl"), "--out",
                 str(tmp_path / "o2")]) == 2


def test_analyze_on_a_visor_model_runs_one_fixed_configuration(synthdoc):
    folder, _, _ = synthdoc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = visorlib.build("visor-synthdoc-tiny", pretrained=True).eval()
    processor = visorlib.processor_for(model)
    samples = load_samples([str(folder / "hard.jsonl")], limit=2)
    report = analyze(model, processor, samples, sa_layers=[1, 3], drop_subsets=1, progress=False)
    assert report["executed_sa_layers"] == [1, 3] and report["layer_drop"]["droppable_layers"] == [1, 3]
    with pytest.raises(ValueError, match="router"):
        analyze(model, processor, samples, sa_layers="router", drop_subsets=0, progress=False)
