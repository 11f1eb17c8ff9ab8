"""visorlib against transformers, for every family of ``hf_oracle.SPECS`` (fp32, eager attention), litgpt-style.

The same tiny random model exists in both libraries: transformers builds it from the visorlib
tiny card and saves it, visorlib loads the saved folder with its own converter, and the logits
must agree to 1e-4 -- on every input kind the family takes, in a left-padded batch (and each row
alone), under SDPA, in greedy generation and from every on-disk key layout. The released
architecture is compared on parameter count, both built on the meta device. Each family's
specifics (processors, checkpoint layouts of other projects, config readers) live beside this
file: tests/test_parity_qwen2_vl.py, tests/test_fastvlm.py.
"""

from __future__ import annotations

import pytest
import torch
from hf_oracle import SPECS, parameters, rename_saved_keys

import visorlib

pytest.importorskip("transformers")

ATOL = 1e-4
SPEC = {spec.family: spec for spec in SPECS}
TIES = [(spec.family, tied) for spec in SPECS for tied in spec.ties]
TIE_IDS = [f"{family}-{'tied' if tied else 'untied'}" for family, tied in TIES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``(family, tied) -> (spec, transformers model, visorlib model)``, each built once per module."""
    built = {}

    def get(family, tied):
        if (family, tied) not in built:
            spec = SPEC[family]
            hf = spec.hf_model(tied)
            folder = spec.save(hf, tmp_path_factory.mktemp(family))
            built[family, tied] = spec, hf, visorlib.from_pretrained(folder, attn_implementation="eager")
        return built[family, tied]

    return get


def compare(spec, hf, ours, inputs, padded=False):
    """Assert visorlib's logits equal the reference's (real positions only); returns visorlib's."""
    expected = spec.hf_logits(hf, inputs, padded)
    with torch.no_grad():
        got = ours(**inputs).logits
    if padded:
        real = inputs["attention_mask"].bool()
        expected, got_real = expected[real], got[real]
    else:
        got_real = got
    torch.testing.assert_close(got_real, expected, atol=ATOL, rtol=0)
    return got


@pytest.mark.parametrize(("family", "tied"), TIES, ids=TIE_IDS)
def test_converter_reads_back_the_tiny_card(reference, family, tied):
    spec, _, ours = reference(family, tied)
    card = spec.tiny_card(tied)
    assert ours.cfg.family == family and ours.cfg.decoder.tie_word_embeddings == tied
    assert ours.cfg.decoder == card.decoder and ours.cfg.vision == card.vision


CASES = [(spec.family, tied, case) for spec in SPECS for tied in spec.ties for case in spec.cases]


@pytest.mark.parametrize(("family", "tied", "case"), CASES,
                         ids=[f"{f}-{'tied' if t else 'untied'}-{c}" for f, t, c in CASES])
def test_logits_match(reference, family, tied, case):
    spec, hf, ours = reference(family, tied)
    compare(spec, hf, ours, spec.cases[case](ours.cfg, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(("family", "tied"), TIES, ids=TIE_IDS)
def test_sdpa_matches_eager(reference, family, tied):
    spec, hf, ours = reference(family, tied)
    inputs = spec.cases[spec.sdpa_case](ours.cfg, torch.Generator().manual_seed(1))
    ours.cfg.attn_implementation = "sdpa"  # the default path (tower and decoder), against the eager oracle
    try:
        compare(spec, hf, ours, inputs)
    finally:
        ours.cfg.attn_implementation = "eager"


@pytest.mark.parametrize(("family", "tied"), TIES, ids=TIE_IDS)
def test_left_padded_batch(reference, family, tied):
    spec, hf, ours = reference(family, tied)
    inputs, alone = spec.padded_batch(ours.cfg, torch.Generator().manual_seed(2))
    got = compare(spec, hf, ours, inputs, padded=True)
    # Each row alone (no padding) gives the same logits as inside the padded batch.
    length = inputs["input_ids"].shape[1]
    for i, row in enumerate(alone):
        with torch.no_grad():
            single = ours(**row).logits[0]
        torch.testing.assert_close(got[i, length - row["input_ids"].shape[1]:], single, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "tied"), TIES, ids=TIE_IDS)
def test_greedy_generation_matches(reference, family, tied):
    spec, hf, ours = reference(family, tied)
    inputs = spec.generation_batch(ours.cfg, torch.Generator().manual_seed(3))
    n = spec.max_new_tokens
    expected = hf.generate(**inputs, **spec.hf_extras(inputs), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    got = ours.generate(**inputs, max_new_tokens=n, eos_token_id=[])
    assert got.shape == expected.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + n)
    assert torch.equal(got, expected)


LAYOUTS = [(spec.family, layout) for spec in SPECS for layout in ["v5-save", *spec.layouts]]


@pytest.mark.parametrize(("family", "layout"), LAYOUTS, ids=[f"{f}-{layout}" for f, layout in LAYOUTS])
def test_key_layouts(tmp_path, family, layout):
    spec = SPEC[family]
    hf = spec.hf_model(tied=False, seed=3)
    folder = spec.save(hf, tmp_path)
    if layout != "v5-save":
        renamed = rename_saved_keys(folder, spec.layouts[layout])
        assert any(old != new for old, new in renamed.items())  # the layout really is another one
    ours = visorlib.from_pretrained(folder, attn_implementation="eager")
    compare(spec, hf, ours, spec.cases[spec.layout_case](ours.cfg, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("family", list(SPEC))
def test_real_size_parameter_count_matches_transformers(family):
    spec = SPEC[family]
    with torch.device("meta"):
        hf = spec.transformers_class()(spec.real_hf_config())
    ours = visorlib.build(spec.card, device="meta")
    assert all(p.is_meta for p in ours.parameters())
    assert parameters(ours) == parameters(hf) == (spec.real_parameters or parameters(hf))
    assert parameters(ours.vision_tower) == spec.hf_vision_parameters(hf)
