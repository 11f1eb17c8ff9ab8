"""The analytic FLOP model agrees with PyTorch's own counter on real forwards."""

from __future__ import annotations

import pytest
import torch
from flop_oracle import flop_counter

import visorlib
from visorlib.processing import anyres
from visorlib.zoo import flops  # resolves zoo names (visorlib.flops.flops takes a config)


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
    with flop_counter() as counter:
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
    assert report.components["decoder_self_attention_layers"] == 2 * matmul_weights * tokens + attention
    assert report.components["decoder_text_only_layers"] == report.components["cross_attention"] == 0
    assert report.kv_cache_bytes == 24 * 7435 * 2 * 2 * 64 * 2
    with pytest.raises(ValueError, match="dense model"):
        flops("llava-ov-0.5b", n_visual=10, n_text=10, sa_layers=[1])


@pytest.mark.parametrize(
    ("config", "packing"),
    [("dense", 1.0)] + [(c, p) for c in ([1], [1, 2], [1, 4], [1, 2, 4]) for p in (1.0, 2.0, 3.0)],
)
def test_visor_flops_match_flop_counter(config, packing):
    from visor_helpers import build, tiny_cfg

    from visorlib.models.llava_onevision import LlavaOnevisionProcessor

    cfg = tiny_cfg(sa_layers=None) if config == "dense" else tiny_cfg(router=False, packing_ratio=packing)
    model = build(cfg)
    size = (60, 90)
    n_visual = LlavaOnevisionProcessor(model.cfg).num_image_tokens(size)
    tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(30), 30)
    ids = torch.cat([torch.randint(0, 200, (1, 5)), torch.full((1, n_visual), cfg.tokens.image_token_id),
                     torch.randint(0, 200, (1, 6))], 1)
    sa_layers = None if config == "dense" else config
    with flop_counter() as counter:
        model(ids, pixel_values=torch.randn(1, tiles, 3, 30, 30), image_sizes=torch.tensor([size]), logits_to_keep=1,
              sa_layers=sa_layers)
    analytic = flops(model, n_visual=n_visual, n_text=11, tiles=tiles, sa_layers=sa_layers).total
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_paper_scale_savings():
    """At 7371 visual tokens the analytic LLM FLOP ratios are the paper's (~3.3x and ~10.9x)."""
    dense = flops("llava-ov-0.5b", n_visual=7371, n_text=64)
    big = flops("visor-llava-ov-0.5b", n_visual=7371, n_text=64, sa_layers=[1, 4, 7, 10, 16, 19, 22])
    small = flops("visor-llava-ov-0.5b", n_visual=7371, n_text=64, sa_layers=[1, 4])
    assert dense.language_model / big.language_model == pytest.approx(3.34, abs=0.05)
    assert dense.language_model / small.language_model == pytest.approx(10.9, abs=0.1)
    assert small.kv_cache_bytes < big.kv_cache_bytes < dense.kv_cache_bytes
    assert small.decode_step < dense.decode_step


def _counted_qwen_forward(case, config, media: str, grid: tuple[int, int, int]):
    """A tiny Qwen-family model of ``case`` run on one image or video of patch grid ``grid`` under
    the FLOP counter: ``(model, n_visual, sa_layers, counted FLOPs)``."""
    from visor_helpers import build

    model = build(case.tiny_cfg(sa_layers=None) if config == "dense" else case.tiny_cfg(router=False))
    t, h, w = grid
    token = model.cfg.tokens.video_token_id if media == "video" else model.cfg.tokens.image_token_id
    n_visual = t * h * w // 4
    ids = torch.cat([torch.randint(0, 200, (1, 5)), torch.full((1, n_visual), token), torch.randint(0, 200, (1, 6))], 1)
    pixels = torch.randn(t * h * w, model.vision_tower.patch_dim)
    pixels_key = "pixel_values_videos" if media == "video" else "pixel_values"
    grid_key = "video_grid_thw" if media == "video" else "image_grid_thw"
    sa_layers = None if config == "dense" else config
    with flop_counter() as counter:
        model(ids, **{pixels_key: pixels, grid_key: torch.tensor([[t, h, w]])}, logits_to_keep=1, sa_layers=sa_layers)
    return model, n_visual, sa_layers, counter.get_total_flops()


@pytest.mark.parametrize(("config", "media"), [("dense", "image"), ("dense", "video"), ([1], "image"), ([1, 2, 4], "video")])
def test_qwen2_vl_flops_match_flop_counter(config, media):
    """Tower by patches (attention per frame), merger, and M-RoPE decoder: within 2 % of the counter."""
    from cases_qwen2_vl import Qwen2VLCase

    t, h, w = 3 if media == "video" else 1, 6, 10  # a video of 3 temporal patches: 3 attention sequences
    model, n_visual, sa_layers, counted = _counted_qwen_forward(Qwen2VLCase(), config, media, (t, h, w))
    report = flops(model, n_visual=n_visual, n_text=11, tiles=[h * w] * t, sa_layers=sa_layers)
    assert report.total == pytest.approx(counted, rel=0.02)
    assert report.components["vision_tower"] > 0 and report.components["projector"] > 0


@pytest.mark.parametrize(("config", "media"), [("dense", "image"), ("dense", "video"), ([1, 2, 4], "image")])
def test_qwen2_5_vl_flops_match_flop_counter(config, media):
    """Windowed tower (attention per window in block 0, per frame in block 1) counted from the grids:
    within 2 % of the counter; counted from per-frame patch counts alone it is an estimate."""
    from cases_qwen2_5_vl import Qwen25VLCase

    t, h, w = (3, 8, 8) if media == "video" else (1, 10, 16)  # 4 and 12 windows (partial ones at the edge) a frame
    model, n_visual, sa_layers, counted = _counted_qwen_forward(Qwen25VLCase(), config, media, (t, h, w))
    report = flops(model, n_visual=n_visual, n_text=11, tiles=[(t, h, w)], sa_layers=sa_layers)
    assert report.total == pytest.approx(counted, rel=0.02)
    tower = report.components["vision_tower"]
    estimate = flops(model, n_visual=n_visual, n_text=11, tiles=[h * w] * t, sa_layers=sa_layers)
    assert estimate.components["projector"] == report.components["projector"] > 0
    assert estimate.components["vision_tower"] == pytest.approx(tower, rel=0.1) and tower > 0


REDUCERS = [
    {"method": "visionzip", "keep": 10},
    {"method": "vispruner", "keep": 12, "step": 2},
    {"method": "hired", "keep": 0.3},
    {"method": "pooling", "keep": 0.25},
    {"method": "fastv", "keep": 0.5, "layer": 2},
    {"method": "pyramiddrop", "layers": [0, 1, 3], "ratios": [1.0, 0.5, 0.2]},
    [{"method": "visionzip", "keep": 10}, {"method": "pyramiddrop", "layers": [0, 1, 3], "ratios": [1.0, 0.5, 0.2]}],
]


@pytest.mark.parametrize("spec", REDUCERS, ids=lambda s: "+".join(r["method"] for r in (s if isinstance(s, list) else [s])))
@pytest.mark.parametrize("config", ["dense", [1, 2], "packed"])
def test_token_reduction_flops_match_flop_counter(spec, config):
    """Each reducer alone, under a VISOR plan and under VISOR-TR packing: analytic within 2 % of the counter,
    with the LLM's visual tokens derived from the tiles exactly as the processor counts them."""
    from visor_helpers import build, tiny_cfg

    from visorlib.models.llava_onevision import LlavaOnevisionProcessor

    cfg = tiny_cfg(sa_layers=None) if config == "dense" else tiny_cfg(router=False, packing_ratio=2.0 if config == "packed"
                                                                        else 1.0)
    model = build(cfg)
    size = (60, 90)
    processor = LlavaOnevisionProcessor(model.cfg)
    n_reduced = processor.num_image_tokens(size, token_reduction=spec)
    tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(30), 30)
    ids = torch.cat([torch.randint(0, 200, (1, 5)), torch.full((1, n_reduced), cfg.tokens.image_token_id),
                     torch.randint(0, 200, (1, 6))], 1)
    sa_layers = None if config == "dense" else [1, 2]
    with flop_counter() as counter:
        model(ids, pixel_values=torch.randn(1, tiles, 3, 30, 30), image_sizes=torch.tensor([size]), logits_to_keep=1,
              sa_layers=sa_layers, token_reduction=spec)
    report = flops(model, n_visual=processor.num_image_tokens(size), n_text=11, tiles=tiles, sa_layers=sa_layers,
                   token_reduction=spec)
    assert report.n_visual == n_reduced
    assert report.total == pytest.approx(counter.get_total_flops(), rel=0.02)
    unreduced = flops(model, n_visual=processor.num_image_tokens(size), n_text=11, tiles=tiles, sa_layers=sa_layers)
    assert report.language_model < unreduced.language_model


@pytest.mark.parametrize("spec", REDUCERS[:3], ids=lambda s: s["method"])
def test_tower_scoring_flops_are_exactly_what_the_reducer_computes(spec):
    """The charged ``vision_scoring`` equals the counter over the reducer alone (tower and projector excluded)."""
    from visor_helpers import build, tiny_cfg

    from visorlib.flops import pre_llm_scoring_flops
    from visorlib.visor.reduction import TowerAttentionCapture, apply_pre_llm, parse_reduction, tower_layers

    model = build(tiny_cfg(sa_layers=None))
    (reducer,) = parse_reduction(spec)
    pixels = torch.randn(7, 3, 30, 30)
    with torch.no_grad(), TowerAttentionCapture(model.vision_tower, tower_layers(reducer)) as capture:
        features = model.vision_tower(pixels)
    with flop_counter() as counter:
        apply_pre_llm(reducer, features, capture, [7], [(2, 3)])
    assert pre_llm_scoring_flops(model.cfg, reducer, 7) == counter.get_total_flops() > 0


def test_reduction_flops_at_paper_scale():
    """7371 visual tokens (10 tiles): the LLM FLOP ratios follow the kept tokens, and scoring stays small."""
    dense = flops("llava-ov-0.5b", n_visual=7371, n_text=64, tiles=10)
    zip_ = flops("llava-ov-0.5b", n_visual=7371, n_text=64, tiles=10, token_reduction={"method": "visionzip"})
    fastv = flops("llava-ov-0.5b", n_visual=7371, n_text=64, tiles=10, token_reduction={"method": "fastv"})
    assert zip_.n_visual == 10 * 128 + 1 and zip_.visual_per_layer == [1281] * 24
    assert fastv.visual_per_layer[:2] == [7371, 7371] and fastv.visual_per_layer[2:] == [3686] * 22
    assert dense.language_model / zip_.language_model == pytest.approx(9.0, abs=0.5)
    assert zip_.components["vision_scoring"] < 0.01 * zip_.components["vision_tower"]
    assert fastv.components["decoder_scoring"] < 0.01 * fastv.language_model
    assert fastv.kv_cache_bytes < dense.kv_cache_bytes and fastv.decode_step < dense.decode_step
    combo = flops("visor-llava-ov-0.5b", n_visual=7371, n_text=64, tiles=10, sa_layers=[1, 4],
                  token_reduction={"method": "visionzip"})
    assert combo.language_model < zip_.language_model
    with pytest.raises(visorlib.ConfigError, match="tiles"):
        flops("llava-ov-0.5b", n_visual=7371, n_text=64, token_reduction={"method": "visionzip"})


def test_the_docs_flops_table_at_7371_visual_tokens_is_what_flops_computes():
    """docs/token-reduction.md's table: every row re-computed (visual tokens, LLM TFLOP, saving, scoring, total, KV)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "token-reduction.md").read_text()
    rows = {
        "none": ([], "llava-ov-0.5b", None),
        "`visionzip` (128 per tile)": ({"method": "visionzip"}, "llava-ov-0.5b", None),
        "`vispruner` (128 per tile)": ({"method": "vispruner"}, "llava-ov-0.5b", None),
        "`hired` (20 %)": ({"method": "hired"}, "llava-ov-0.5b", None),
        "`pooling` (8×)": ({"method": "pooling"}, "llava-ov-0.5b", None),
        "`fastv` (K 2, R 50 %)": ({"method": "fastv"}, "llava-ov-0.5b", None),
        "`pyramiddrop` (easy)": ({"method": "pyramiddrop"}, "llava-ov-0.5b", None),
        "`pyramiddrop` (hard)": ({"method": "pyramiddrop", "layers": [0, 4, 10, 16], "ratios": [1.0, 0.5, 0.25, 0.125]},
                                 "llava-ov-0.5b", None),
        "`visionzip` then `fastv`": ([{"method": "visionzip"}, {"method": "fastv"}], "llava-ov-0.5b", None),
        "VISOR 8CA-2SA `[1, 4]`": ([], "visor-llava-ov-0.5b", [1, 4]),
        "VISOR 8CA-2SA `[1, 4]` + `visionzip`": ({"method": "visionzip"}, "visor-llava-ov-0.5b", [1, 4]),
    }
    dense = flops("llava-ov-0.5b", 7371, 64, tiles=10, token_reduction=[]).language_model
    for label, (spec, card, sa_layers) in rows.items():
        r = flops(card, 7371, 64, tiles=10, sa_layers=sa_layers, token_reduction=spec)
        scoring = r.components.get("vision_scoring", 0) + r.components.get("decoder_scoring", 0)
        line = (f"| {label} | {r.visual_per_layer[0]} | {r.visual_per_layer[-1]} | {sum(r.visual_per_layer) / 24:.0f} | "
                f"{r.language_model / 1e12:.2f} | {dense / r.language_model:.1f}× | {scoring / 1e9:.1f} | "
                f"{r.total / 1e12:.2f} | {r.kv_cache_bytes / 2**20:.1f} MiB |").replace("| 0.0 |", "| 0 |")
        assert line in page, line
