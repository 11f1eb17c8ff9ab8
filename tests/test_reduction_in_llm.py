"""In-LLM token reduction (FastV, PyramidDrop) inside the executor, on every family, dense and VISOR.

What is checked: keeping every token changes no logit at a real position; a reducer that drops
tokens changes the answer; a left-padded batch with different kept counts per sample equals each
sample alone; cached generation equals recomputing the whole prefix under the same rule; the
scores the executor computes from a layer's input equal that layer's own attention row (eager,
materialised here); bad layers are refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from visor_helpers import CASES, build

from visorlib.modules.layers import apply_rotary
from visorlib.visor import LayerRequest
from visorlib.visor.pruning import last_token_scores
from visorlib.visor.reduction import ReductionSpecError

FASTV = {"method": "fastv", "keep": 0.5, "layer": 2}
PDROP = {"method": "pyramiddrop", "layers": [0, 1, 3], "ratios": [1.0, 0.5, 0.2]}
METHODS = {"fastv": FASTV, "pyramiddrop": PDROP}


def model_and_batch(case, visor: bool):
    cfg = case.tiny_cfg(router=False) if visor else case.tiny_cfg(sa_layers=None)
    model = build(cfg)
    rows = [case.sample(model, v, routing=False, seed=v) for v in range(3)]
    return model, case.batch(model, rows, seed=0)


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


@pytest.mark.parametrize("visor", [False, True], ids=["dense", "visor"])
@pytest.mark.parametrize("method", list(METHODS))
def test_keep_all_changes_nothing_and_dropping_changes_the_answer(case, visor, method):
    model, inputs = model_and_batch(case, visor)
    keep_all = dict(METHODS[method], **({"keep": 1.0} if method == "fastv" else {"ratios": [1.0, 1.0, 1.0]}))
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        base = model(**inputs).logits
        same = model(**inputs, token_reduction=keep_all).logits
        reduced = model(**inputs, token_reduction=METHODS[method]).logits
    assert torch.equal(base[real], same[real])  # padding positions carry no prediction when pruning
    assert not torch.allclose(base[real], reduced[real], atol=1e-4)


@pytest.mark.parametrize("visor", [False, True], ids=["dense", "visor"])
@pytest.mark.parametrize("method", list(METHODS))
def test_padded_batch_equals_each_sample_alone(case, visor, method):
    model, inputs = model_and_batch(case, visor)
    with torch.no_grad():
        batch = model(**inputs, token_reduction=METHODS[method]).logits
        for i in range(inputs["input_ids"].shape[0]):
            alone = model(**case.row_inputs(inputs, i, model), token_reduction=METHODS[method]).logits[0]
            real = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(batch[i, real], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("visor", [False, True], ids=["dense", "visor"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_generation_equals_recomputation(request, case, visor, method):
    if case.name == "internvl" and not visor:
        # Open (issue 23): the recomputation ranks the visual tokens by the *appended* token's query,
        # the cached run by the prompt's last one; the tiny InternVL's ranking is not stable under that.
        request.applymarker(pytest.mark.xfail(reason="ranking query differs between the two runs", strict=False))
    model, inputs = model_and_batch(case, visor)
    single = case.row_inputs(inputs, 0, model)
    spec = METHODS[method]
    out = model.generate(**single, max_new_tokens=4, token_reduction=spec)
    prompt = single["input_ids"].shape[1]
    current, expected = dict(single), []
    with torch.no_grad():
        for _ in range(4):  # no cache: the whole prefix again, pruned again under the same rule
            step = model(**current, token_reduction=spec).logits[0, -1].argmax()
            expected.append(int(step))
            current["input_ids"] = torch.cat([current["input_ids"], step.view(1, 1)], dim=1)
    assert out[0, prompt:].tolist() == expected


def test_scores_equal_the_layers_own_attention_row():
    """The executor's score of layer 2 (from its input) == softmax(q_last k^T) of the eager layer, mean over heads."""
    case = CASES[0]
    model, inputs = model_and_batch(case, visor=False)
    single = case.row_inputs(inputs, 1, model)
    embeds, visual, segments, positions = case.embed(model, single)
    lm = model.language_model
    executor = lm.executor()
    with torch.no_grad():
        state = executor.start(embeds, positions, torch.ones_like(single["input_ids"]), visual, segments)
        executor.run_layers(state, LayerRequest.parse(lm.plan, None, 1).mask(lm.plan.num_layers), range(2))
        layer = model.decoder.layers[2]
        scores = last_token_scores(state, layer)
        x = layer.input_layernorm(state.merged())
        attn = layer.self_attn
        cos, sin = state.full_rope()
        q = apply_rotary(attn.split_heads(attn.q_proj(x), attn.num_heads), cos, sin)
        k = apply_rotary(attn.split_heads(attn.k_proj(x), attn.num_kv_heads), cos, sin)
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        weights = (q @ k.transpose(-1, -2) / attn.head_dim**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        reference = weights[0, :, -1].mean(0)[visual[0]]
    torch.testing.assert_close(scores[0], reference, atol=1e-6, rtol=1e-5)


def test_bad_layers_are_refused():
    case = CASES[0]
    model, inputs = model_and_batch(case, visor=True)
    with pytest.raises(ReductionSpecError, match="layer"):
        model(**inputs, token_reduction={"method": "fastv", "layer": 6})
    with pytest.raises(ReductionSpecError, match="out of range"):
        model(**inputs, token_reduction={"method": "pyramiddrop", "layers": [0, 2, 9], "ratios": [1.0, 0.5, 0.2]})
