"""The VISOR language model owns its parts and says what each training stage updates (issue 20).

On a tiny model of every family (tests/visor_helpers.py ``CASES``): the language model is an
``nn.Module`` holding the decoder, cross-attention blocks, router and packer; checkpoints keep the
names every visorlib checkpoint has (``decoder.*``, not ``language_model.decoder.*``) and load bit
for bit; and the trainer's stage-1 / stage-2 / router sets are exactly the ones the model reports,
which are in turn exactly what the name-prefix rule the trainer used before selected.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from visor_helpers import CASES, build

from visorlib.train.trainer import freeze_for_stage
from visorlib.visor import VisorLanguageModel


@pytest.fixture(scope="module", params=CASES, ids=lambda c: type(c).__name__)
def case_model(request):
    case = request.param
    model = build(case.tiny_cfg(), seed=0)
    model.frozen_by_family = {id(p) for p in model.parameters() if not p.requires_grad}  # e.g. SigLIP's unused norm
    return case, model


def _as_built(model) -> None:
    for param in model.parameters():
        param.requires_grad_(id(param) not in model.frozen_by_family)


def _old_prefix_rule(model, stage, freeze_vision_tower=False) -> set[str]:
    """What ``trainer.trainable_names`` selected before the language model owned its parts (flat names)."""
    names = {n.removeprefix("language_model.") for n, p in model.named_parameters() if p.requires_grad}
    if stage == "router":
        return {n for n in names if n.startswith("router.")}
    if stage == 1:
        packing = model.packer is not None
        return {n for n in names if n.startswith("cross_attention.") or (packing and n.startswith("projector.linear_1"))}
    names = {n for n in names if not n.startswith("router.")}
    return {n for n in names if not (freeze_vision_tower and n.startswith("vision_tower."))}


def test_the_language_model_is_a_module_that_owns_its_parts(case_model):
    _, model = case_model
    lm = model.language_model
    assert isinstance(lm, VisorLanguageModel) and isinstance(lm, nn.Module)
    owned = dict(lm.named_children())
    assert owned["decoder"] is model.decoder and owned["router"] is model.router
    assert owned["cross_attention"] is model.cross_attention and set(model.cross_attention) == {"0", "3"}
    # No family-level copies: every decoder / block parameter is reached through the language model once.
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.split(".")[0] in ("decoder", "cross_attention", "router")]
    assert set(lm.visor_parameters()) == {n for n, _ in lm.named_parameters()
                                          if n.startswith(("cross_attention.", "router."))}


def test_checkpoint_names_are_unchanged_and_load_bit_exactly(case_model):
    case, model = case_model
    state = model.state_dict()
    assert not [k for k in state if k.startswith("language_model.")]
    assert {k.split(".")[0] for k in state} >= {"decoder", "cross_attention", "router"}
    other = build(case.tiny_cfg(), seed=1)
    other.load_state_dict(state)  # flat (on-disk) names, through the load hook
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    nested = {("language_model." + k if k.split(".")[0] in ("decoder", "cross_attention", "router") else k): v
              for k, v in state.items()}
    build(case.tiny_cfg(), seed=2).load_state_dict(nested)  # in-memory names load as they are


@pytest.mark.parametrize("stage", [1, 2, "router"])
def test_trainer_stage_sets_are_the_models_own(case_model, stage):
    _, model = case_model
    for freeze in (False, True) if stage == 2 else (False,):
        _as_built(model)
        reported = model.parameters_for(stage, freeze)
        before = _old_prefix_rule(model, stage, freeze)
        trained = freeze_for_stage(model, stage, freeze)
        learning = {id(p) for p in model.parameters() if p.requires_grad}
        assert learning == {id(p) for p in reported.values()} == {id(p) for p in trained.values()}
        assert {n.removeprefix("language_model.") for n in reported} == before
        assert reported, f"stage {stage} trains nothing"
    _as_built(model)
