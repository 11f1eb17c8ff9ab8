"""visorlib's LLaVA-OneVision against transformers' (fp32, eager attention), litgpt-style.

The same tiny random model exists in both libraries: transformers builds and saves it, visorlib
loads the saved folder with its own converter, and the logits must agree to 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from hf_oracle import IMAGE_TOKEN, TILE, VIDEO_TOKEN, left_pad, save_hf, tiny_hf_model

import visorlib
from visorlib.processing import anyres

ATOL = 1e-4
GRID = TILE // 6


def image_tokens(size, tiled=True):
    cfg = visorlib.get_config("llava-ov-0.5b").processing
    return anyres.num_image_tokens(size, cfg.pinpoints(TILE), TILE, GRID, cfg.max_tiles, tiled=tiled)


def prompt(*segments):
    """Concatenate text chunks (random ids) and placeholder runs into one row of ids."""
    parts = []
    for seg in segments:
        parts.append(torch.full((seg[1],), seg[0]) if isinstance(seg, tuple) else torch.randint(0, 240, (seg,)))
    return torch.cat(parts)[None]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(tied=request.param)
    folder = save_hf(hf, tmp_path_factory.mktemp("hf"))
    ours = visorlib.from_pretrained(folder, attn_implementation="eager")
    return hf, ours


def compare(hf, ours, atol=ATOL, valid=None, **inputs):
    torch.manual_seed(1)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = ours(**inputs).logits
    if valid is not None:
        expected, got = expected[valid.bool()], got[valid.bool()]
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "size",
    [(60, 90), (90, 60), (45, 200), (200, 40), (30, 30), (300, 310), (1000, 997)],
    ids=["wide-unpad", "tall-unpad", "very-wide", "very-tall", "one-tile", "downscale", "downscale-large"],
)
def test_single_image(pair, size):
    hf, ours = pair
    tiles = anyres.num_tiles(size, ours.cfg.processing.pinpoints(TILE), TILE)
    ids = prompt(4, (IMAGE_TOKEN, image_tokens(size)), 7)
    compare(hf, ours, input_ids=ids, pixel_values=torch.randn(1, tiles, 3, TILE, TILE),
            image_sizes=torch.tensor([size]))


def test_multi_image(pair):
    hf, ours = pair
    sizes = [(60, 90), (200, 40), (30, 30)]
    ids = prompt(2, (IMAGE_TOKEN, image_tokens(sizes[0], tiled=False)), 3,
                 (IMAGE_TOKEN, image_tokens(sizes[1], tiled=False)), 1,
                 (IMAGE_TOKEN, image_tokens(sizes[2], tiled=False)), 5)
    # pixel_values is padded to the largest tile count, as the processors produce it.
    compare(hf, ours, input_ids=ids, pixel_values=torch.randn(3, 13, 3, TILE, TILE),
            image_sizes=torch.tensor(sizes), batch_num_images=torch.tensor([3]))


def test_video(pair):
    hf, ours = pair
    frames = 4
    ids = prompt(3, (VIDEO_TOKEN, anyres.num_video_tokens(frames, GRID)), 6)
    compare(hf, ours, input_ids=ids, pixel_values_videos=torch.randn(1, frames, 3, TILE, TILE))


def test_text_only(pair):
    hf, ours = pair
    compare(hf, ours, input_ids=prompt(19))


def test_left_padded_batch(pair):
    hf, ours = pair
    sizes = [(60, 90), (45, 200)]
    rows = [prompt(3, (IMAGE_TOKEN, image_tokens(sizes[0])), 9)[0], prompt(1, (IMAGE_TOKEN, image_tokens(sizes[1])), 2)[0]]
    ids, mask = left_pad(rows)
    length = ids.shape[1]
    tiles = max(anyres.num_tiles(s, ours.cfg.processing.pinpoints(TILE), TILE) for s in sizes)
    # Explicit padding-aware positions: transformers' forward (unlike its generate) would
    # otherwise count padding; visorlib derives the same positions from the mask on its own.
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, tiles, 3, TILE, TILE),
                  image_sizes=torch.tensor(sizes))
    torch.manual_seed(1)
    with torch.no_grad():
        expected = hf(**inputs, position_ids=positions).logits
        got = ours(**inputs).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=ATOL, rtol=0)
    # Each row alone (no padding) gives the same logits as inside the padded batch.
    for i, row in enumerate(rows):
        n = anyres.num_tiles(sizes[i], ours.cfg.processing.pinpoints(TILE), TILE)
        with torch.no_grad():
            alone = ours(row[None], pixel_values=inputs["pixel_values"][i : i + 1, :n],
                         image_sizes=inputs["image_sizes"][i : i + 1]).logits[0]
        torch.testing.assert_close(got[i, length - len(row):], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["v4", "v5-save", "v5-runtime"])
def test_key_layouts(tmp_path, layout):
    hf = tiny_hf_model(tied=False, seed=3)
    ours = visorlib.from_pretrained(save_hf(hf, tmp_path, layout), attn_implementation="eager")
    size = (60, 90)
    compare(hf, ours, input_ids=prompt(2, (IMAGE_TOKEN, image_tokens(size)), 3),
            pixel_values=torch.randn(1, 7, 3, TILE, TILE), image_sizes=torch.tensor([size]))


def test_sdpa_matches_eager(pair):
    hf, ours = pair
    ours.cfg.attn_implementation = "sdpa"  # the default path, compared with the eager oracle
    try:
        compare(hf, ours, input_ids=prompt(5, (IMAGE_TOKEN, image_tokens((60, 90))), 5),
                pixel_values=torch.randn(1, 7, 3, TILE, TILE), image_sizes=torch.tensor([(60, 90)]))
    finally:
        ours.cfg.attn_implementation = "eager"


def test_greedy_generation_matches(pair):
    hf, ours = pair
    sizes = [(60, 90), (45, 200)]
    rows = [prompt(3, (IMAGE_TOKEN, image_tokens(sizes[0])), 4)[0], prompt(2, (IMAGE_TOKEN, image_tokens(sizes[1])), 1)[0]]
    ids, mask = left_pad(rows)
    length = ids.shape[1]
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 13, 3, TILE, TILE),
                  image_sizes=torch.tensor(sizes))
    expected = hf.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                           min_new_tokens=20)
    got = ours.generate(**inputs, max_new_tokens=20, eos_token_id=[])
    assert got.shape == expected.shape == (2, length + 20)
    assert torch.equal(got, expected)
