"""InternVL specifics next to the shared suites (parity spec ``hf_oracle.INTERNVL``, ``cases_internvl.InternVLCase``).

Here: the dynamic tiles and thumbnail against transformers' ``GotOcr2ImageProcessor`` (the image
processor of the ``-hf`` checkpoints), the FLOP model against ``FlopCounterMode`` (tower with its
class token, projector, decoder; dense and VISOR), and pre-LLM ``pooling`` (keep-all equals no
reduction; the processor's counts are what the model produces), the refusal of attention-scored
methods, and the Hub ``config.json`` reader.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flop_oracle import flop_counter
from PIL import Image
from visor_helpers import build

import visorlib
from visorlib.flops import flops
from visorlib.models.internvl import InternVLProcessor
from visorlib.models.internvl.convert import config_from_hf
from visorlib.visor.reduction import ReductionSpecError


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(448, 448), (300, 1000), (900, 500), (100, 3000)])
def test_tiles_and_thumbnail_match_transformers(size):
    transformers = pytest.importorskip("transformers")
    cfg = visorlib.get_config("internvl3-1b")
    p = cfg.processing
    hf = transformers.GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=p.max_tiles,
                                            size={"height": 448, "width": 448}, image_mean=p.image_mean,
                                            image_std=p.image_std)
    image = _image(*size, seed=sum(size))
    got = InternVLProcessor(cfg)(images=[image])["pixel_values"]
    expected = hf(images=[image], return_tensors="pt")["pixel_values"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert InternVLProcessor(cfg).num_image_tokens(size) == 256 * len(got)


def _image_inputs(model, tiles=3, n_text=11):
    n_visual = tiles * model.cfg.vision.tokens_per_tile
    ids = torch.cat([torch.randint(0, 200, (1, 5)), torch.full((1, n_visual), model.cfg.tokens.image_token_id),
                     torch.randint(0, 200, (1, n_text - 5))], 1)
    side = model.cfg.vision.image_size
    return ids, torch.randn(tiles, 3, side, side), n_visual


@pytest.mark.parametrize("config", ["dense", [1, 2, 4]])
def test_flops_match_flop_counter(config):
    from cases_internvl import InternVLCase

    case = InternVLCase()
    model = build(case.tiny_cfg(sa_layers=None) if config == "dense" else case.tiny_cfg(router=False))
    ids, pixels, n_visual = _image_inputs(model)
    sa_layers = None if config == "dense" else config
    with flop_counter() as counter:
        model(ids, pixel_values=pixels, logits_to_keep=1, sa_layers=sa_layers)
    report = flops(model, n_visual=n_visual, n_text=11, tiles=3, sa_layers=sa_layers)
    assert report.total == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert report.components["vision_tower"] > 0 and report.components["projector"] > 0


def test_pooling_keep_all_is_unreduced_and_counts_match():
    model = build(visorlib.get_config("internvl3-1b").tiny())
    ids, pixels, _ = _image_inputs(model)
    with torch.no_grad():
        base = model(ids, pixel_values=pixels).logits
        same = model(ids, pixel_values=pixels, token_reduction={"method": "pooling", "keep": 1.0}).logits
    assert torch.equal(base, same)
    spec = {"method": "pooling", "keep": 0.25}  # 4x4 tokens a tile -> 2x2
    kept = InternVLProcessor(model.cfg).num_image_tokens((100, 250), token_reduction=spec)
    tiles = kept // 4  # each tiny tile keeps 2x2 tokens
    short = torch.cat([ids[:, :5], torch.full((1, kept), model.cfg.tokens.image_token_id), ids[:, -6:]], 1)
    with torch.no_grad():
        out = model(short, pixel_values=torch.randn(tiles, 3, 48, 48), token_reduction=spec).logits
    assert out.shape[1] == short.shape[1]
    with pytest.raises(ReductionSpecError, match="InternViT"):
        model(ids, pixel_values=pixels, token_reduction={"method": "visionzip", "keep": 4})


def test_hub_config_is_read_into_the_card():
    # The layout of OpenGVLab/InternVL3-1B-hf's config.json (transformers 5 names).
    hub = {"model_type": "internvl", "downsample_ratio": 0.5, "image_token_id": 151667, "projector_hidden_act": "gelu",
           "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
           "text_config": {"model_type": "qwen2", "vocab_size": 151674, "hidden_size": 896, "intermediate_size": 4864,
                           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                           "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
           "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                             "intermediate_size": 4096, "image_size": [448, 448], "patch_size": [14, 14],
                             "attention_bias": True, "layer_scale_init_value": 0.1, "hidden_act": "gelu"}}
    cfg, card = config_from_hf(hub, "config.json", "internvl3-1b"), visorlib.get_config("internvl3-1b")
    assert cfg.vision == card.vision and cfg.decoder == card.decoder and cfg.tokens == card.tokens
    assert cfg.processing == card.processing
    with pytest.raises(visorlib.config.ConfigError, match="norm_type"):
        config_from_hf({**hub, "vision_config": {**hub["vision_config"], "norm_type": "rms_norm"}})
