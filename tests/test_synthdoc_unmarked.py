"""The unmarked synthdoc layout of ``benchmarks/synthdoc_unmarked.py``: the capacity argument it
rests on (nothing tile-local says where a tile is; the best column-only reader's bound) and its
recorded result. (Its recipes, the CA-only baseline among them, run two shrunk steps each in
tests/test_synthdoc.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import visorlib
from visorlib.demo import HELD_OUT_SEED
from visorlib.train.synthdoc import pages
from visorlib.train.synthdoc_stamps import INKS, QUADRANTS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from synthdoc_unmarked import (  # noqa: E402
    UNMARKED_PATTERNS,
    located_reader_bound,
    stamp_box,
    unmarked_task,
)

TILE = visorlib.get_config("visor-synthdoc-tiny").vision.image_size


def test_unmarked_pages_are_deterministic_and_inked_only_in_the_middle_of_each_tile():
    first = [(np.asarray(img), facts) for img, facts, _ in pages(5, 6, TILE, unmarked_task())]
    again = [(np.asarray(img), facts) for img, facts, _ in pages(5, 6, TILE, unmarked_task())]
    assert all(np.array_equal(a, b) and fa == fb for (a, fa), (b, fb) in zip(first, again, strict=True))
    for page, facts in first:
        ink = np.all(page == INKS[facts["ink"]], axis=-1)
        inside = np.zeros_like(ink)
        for quadrant in range(4):
            x0, y0, x1, y1 = stamp_box(quadrant, TILE)
            inside[y0:y1, x0:x1] = True
            assert ink[y0:y1, x0:x1].mean() == 0.5  # every pattern inks half its stamp
        assert not (ink & ~inside).any()
        assert set(facts["patterns"].values()) <= set(UNMARKED_PATTERNS)


def test_nothing_tile_local_says_where_a_tile_is():
    """Tiles with the same pattern are the same picture, and the glance (the base tile the
    processor makes) shows every stamp as the same half-tone: only the token sequence locates."""
    cfg = visorlib.get_config("visor-synthdoc-tiny")
    processor = visorlib.models.family_of(cfg).processor(cfg, None)
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for image, facts, _ in pages(4, 8, TILE, unmarked_task()):
        page = np.asarray(image)
        tiles = {q: page[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for q, (r, c) in zip(QUADRANTS, corners, strict=True)}
        for q in QUADRANTS[1:]:
            same = facts["patterns"][q] == facts["patterns"]["top left"]
            assert np.array_equal(tiles[q], tiles["top left"]) == same
        base = processor.preprocess(None, [image], None)[0]["pixel_values"][0][0].numpy()
        means = [base[:, y0 // 2:y1 // 2, x0 // 2:x1 // 2].mean() for x0, y0, x1, y1 in map(lambda k: stamp_box(k, TILE), range(4))]
        assert max(means) - min(means) < 0.02  # on the [-1, 1] pixel scale: about one grey level


def test_column_only_reader_bound():
    bound = located_reader_bound(1, 3000, TILE)
    assert bound["easy"] == 1.0
    assert bound["hard"] == pytest.approx(2 / 3, abs=0.02)  # same column patterns 1/3, else a coin flip
    assert bound["pair"] == pytest.approx(14 / 27, abs=0.03)
    held_out = located_reader_bound(HELD_OUT_SEED, 100, TILE)
    assert held_out["hard"] < 0.7 and held_out["pair"] < 0.6


def test_recorded_result_is_consistent_with_the_bound():
    """The committed result: what the chain measured, read against the bound it was built on."""
    result = json.loads((BENCHMARKS / "results" / "synthdoc-unmarked.json").read_text())
    assert result["layout"] == "unmarked" and result["held_out_seed"] == HELD_OUT_SEED
    bound = located_reader_bound(HELD_OUT_SEED, result["held_out_pages"], TILE)
    assert result["ca_only_bound"] == pytest.approx(bound)
    ca = next(r for r in result["evaluation"]["independent-ca"])["accuracy"]
    assert ca["hard"] <= bound["hard"] + 0.05  # the independently trained CA-only model found no way round it
