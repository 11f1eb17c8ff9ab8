"""The analytic FLOP model agrees with PyTorch's own counter on real forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import visorlib
from visorlib.flops import flops
from visorlib.processing import anyres


@pytest.mark.parametrize("size", [(30, 30), (60, 90), (300, 310)])
def test_dense_prefill_flops_match_flop_counter(size):
    torch.manual_seed(0)
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    model = visorlib.zoo.instantiate(cfg).eval()
    pins = cfg.processing.pinpoints(30)
    n_visual = anyres.num_image_tokens(size, pins, 30, cfg.vision.grid_size, cfg.processing.max_tiles)
    tiles = anyres.num_tiles(size, pins, 30)
    n_text = 11
    ids = torch.cat([torch.randint(0, 200, (1, 5)), torch.full((1, n_visual), cfg.tokens.image_token_id),
                     torch.randint(0, 200, (1, n_text - 5))], 1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, pixel_values=torch.randn(1, tiles, 3, 30, 30), image_sizes=torch.tensor([size]), logits_to_keep=1)
    measured = counter.get_total_flops()
    analytic = flops(model, n_visual=n_visual, n_text=n_text, tiles=tiles).total
    assert analytic == pytest.approx(measured, rel=0.02)


def test_real_size_numbers_are_plausible():
    report = flops("llava-ov-0.5b", n_visual=7371, n_text=64)
    model = visorlib.build("llava-ov-0.5b", device="meta")
    tokens = 7371 + 64
    # Every linear weight is used once per token (2 FLOPs per multiply-add); attention adds the
    # full-rectangle QK^T and AV products.
    matmul_weights = sum(p.numel() for n, p in model.decoder.layers.named_parameters() if p.dim() == 2)
    attention = 24 * 4 * tokens**2 * 896
    assert report.components["decoder"] == 2 * matmul_weights * tokens + attention
    assert report.kv_cache_bytes == 24 * 7435 * 2 * 2 * 64 * 2
    with pytest.raises(ValueError, match="dense model"):
        flops("llava-ov-0.5b", n_visual=10, n_text=10, sa_layers=[1])
