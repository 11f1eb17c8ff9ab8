"""VISOR blocks in isolation: positional convolution, token packing, layer plans."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from visor_helpers import batch, build, sample, tiny_cfg

from visorlib.config import ConfigError, VisorConfig
from visorlib.models.llava_onevision import LlavaOnevisionProcessor
from visorlib.visor import ConvPositionalEmbedding, LayerPlan, TokenPacker, widen_projector


def test_conv_positional_embedding_never_crosses_images():
    torch.manual_seed(0)
    pe = ConvPositionalEmbedding(8, 7)
    torch.nn.init.normal_(pe.conv.weight)
    torch.nn.init.normal_(pe.conv.bias)
    lengths = [5, 2, 9]
    x = torch.randn(1, sum(lengths) + 3, 8)
    segments = torch.tensor([[-1] * 3 + [i for i, n in enumerate(lengths) for _ in range(n)]])
    out = pe(x, segments)
    start = 3
    for n in lengths:
        alone = x[:, start:start + n]
        expected = alone + F.conv1d(alone.transpose(1, 2), pe.conv.weight, pe.conv.bias, padding=3, groups=8).transpose(1, 2)
        torch.testing.assert_close(out[:, start:start + n], expected, atol=1e-5, rtol=0)
        start += n
    assert torch.equal(out[:, :3], x[:, :3])  # padding untouched
    assert torch.equal(ConvPositionalEmbedding(8)(x, segments), x)  # zero-initialised: identity


@pytest.mark.parametrize(("ratio", "side"), [(2.0, 19), (3.0, 16), (4.0, 14), (1.5, 22)])
def test_token_packing_any_ratio(ratio, side):
    packer = TokenPacker(27, ratio)
    out = packer(torch.randn(3, 729, 10))
    assert out.shape == (3, side * side, 40)
    assert 729 / out.shape[1] == pytest.approx(ratio, rel=0.08)


def test_widened_projector_starts_as_the_2x2_average():
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 6)
    wide = widen_projector(linear)
    packer = TokenPacker(27, 4.0)
    tiles = torch.randn(2, 729, 10)
    packed = packer(tiles)  # [n, side², 4C] with channels ordered (dh, dw, c)
    mean = packed.view(2, -1, 4, 10).mean(2)
    torch.testing.assert_close(wide(packed), linear(mean), atol=1e-5, rtol=0)


def test_packed_model_runs_with_processor_token_counts():
    model = build(tiny_cfg(router=False, packing_ratio=2.0))
    assert model.cfg.feature_grid_size == 4  # 5x5 tile grid -> 4x4 after 2x packing
    inputs = batch(model, [sample(model, (60, 90), routing=False), sample(model, (200, 40), routing=False, seed=1)])
    assert LlavaOnevisionProcessor(model.cfg).num_image_tokens((60, 90)) < LlavaOnevisionProcessor(
        build(tiny_cfg(router=False)).cfg).num_image_tokens((60, 90))
    with torch.no_grad():
        out = model(**inputs, sa_layers=[1, 4])
    assert torch.isfinite(out.logits).all()


def test_layer_plan_roles_and_router_position():
    plan = LayerPlan(6, VisorConfig(ca_layers=[0, 3], sa_layers=[1, 2, 4], configurations=[[1], [1, 2], [1, 4]]))
    assert plan.roles == ["cross", "self", "self", "cross", "self", "text"]
    assert plan.always_executed == [1] and plan.router_layer == 1
    assert plan.describe([1, 4]) == "2CA-2SA"
    dense = LayerPlan(4)
    assert dense.dense and dense.roles == ["self"] * 4 and dense.default == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="nothing to choose"):
        _ = LayerPlan(6, VisorConfig(sa_layers=[1, 2], configurations=[[1, 2]])).router_layer
    with pytest.raises(ConfigError, match="repeated layers"):
        LayerPlan(6, VisorConfig(sa_layers=[1, 1]))
