"""The order task: deterministic pages, nothing but the token order places a stamp, and the bound.

These are the facts the shipped model's story rests on (docs/synthdoc.md): if a tile or the glance
told a stamp's row, cross-attention alone could answer ``order`` and ``above`` questions, and the
gap between CA-only and the configurations with self-attention would prove nothing.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import visorlib
from visorlib import zoo
from visorlib.demo import HELD_OUT_SEED
from visorlib.train.synthdoc import TASKS, make_synthdoc_dataset, pages
from visorlib.train.synthdoc_order import (
    CATEGORIES,
    MID,
    NAMES,
    answer,
    render_order_page,
    row_blind_bound,
    stamp_box,
    stamp_colours,
    swap_rows,
)

TASK = TASKS["order"]
CFG = visorlib.get_config("visor-synthdoc-tiny")
TILE = CFG.vision.image_size


def test_pages_are_deterministic_per_seed_and_differ_between_seeds():
    first = [(np.asarray(i), f, q) for i, f, q in pages(7, 5, TILE, TASK)]
    again = [(np.asarray(i), f, q) for i, f, q in pages(7, 5, TILE, TASK)]
    other = [np.asarray(i) for i, _, _ in pages(8, 5, TILE, TASK)]
    for (a, fa, qa), (b, fb, qb) in zip(first, again, strict=True):
        assert np.array_equal(a, b) and fa == fb and qa == qb
    assert not all(np.array_equal(a, b) for (a, _, _), b in zip(first, other, strict=True))


def test_every_stamp_is_the_checkerboard_of_its_ink_in_the_middle_of_its_tile():
    for image, facts, _ in pages(3, 10, TILE, TASK):
        page = np.asarray(image).astype(int)
        assert len(set(facts["stamps"].values())) == 4 and set(facts["stamps"].values()) <= set(NAMES)
        for quadrant, name in enumerate(facts["stamps"].values()):
            x0, y0, x1, y1 = stamp_box(quadrant, TILE)
            ink, mirror = stamp_colours(name)
            region = page[y0:y1, x0:x1]
            assert (region[0, 0] == ink).all() and (region[0, 1] == mirror).all() and (region[1, 0] == mirror).all()
            # the two colours average to mid-grey: the glance cannot tell stamps apart
            assert np.abs((ink.astype(int) + mirror.astype(int)) / 2 - MID).max() <= 0.5
        outside = np.ones(page.shape[:2], bool)
        for quadrant in range(4):
            x0, y0, x1, y1 = stamp_box(quadrant, TILE)
            outside[y0:y1, x0:x1] = False
        assert (page[outside] == page[0, 0]).all()  # nothing but background outside the stamps


def test_the_inks_differ_at_full_resolution():
    colours = {name: stamp_colours(name)[0].astype(int) for name in NAMES}
    for a in NAMES:
        for b in NAMES:
            if a != b:
                assert np.abs(colours[a] - colours[b]).max() >= 20, (a, b)


def test_swapping_the_rows_changes_nothing_cross_attention_alone_can_see():
    """The tiles are the same set, and the glance differs by at most 2 grey levels (resize rounding)."""
    processor = zoo.processor_for(zoo.build("synthdoc-tiny"))
    rng = random.Random(0)
    for _ in range(10):
        image, facts = render_order_page(rng, TILE)
        page = np.asarray(image)
        swapped = np.concatenate([page[TILE:], page[:TILE]])
        a = processor.preprocess(["<image>"], [image], None)[0]["pixel_values"][0]
        b = processor.preprocess(["<image>"], [Image.fromarray(swapped)], None)[0]["pixel_values"][0]
        assert (a[0] - b[0]).abs().max() * 255 * CFG.processing.image_std[0] <= 2.01  # the glance
        key = lambda t: t.numpy().tobytes()  # noqa: E731
        assert sorted(map(key, a[1:])) == sorted(map(key, b[1:]))  # the same four tiles
        # ... and the page's questions about rows all change their answers
        twin = swap_rows(facts)
        for category, question, truth in TASK.questions(facts, random.Random(1)):
            assert answer(facts, question) == truth
            assert (answer(twin, question) != truth) == (category in ("order", "above"))


def test_row_blind_bound_on_the_held_out_pages():
    drawn = list(pages(HELD_OUT_SEED, 50, TILE, TASK))
    bound = row_blind_bound([f for _, f, _ in drawn], [q for _, _, q in drawn])
    assert bound == {"easy": 1.0, "missing": 1.0, "order": 0.5, "above": 0.5}


def test_questions_are_balanced():
    counts = {c: [] for c in CATEGORIES}
    for _, _, qa in pages(4, 200, TILE, TASK):
        for category, _, truth in qa:
            counts[category].append(truth)
    assert len(counts["order"]) == 800 and abs(counts["order"].count("yes") / 800 - 0.5) < 0.06
    assert len(counts["missing"]) == 200 and set(counts["missing"]) == set(NAMES)
    assert abs(counts["above"].count("nothing") / 400 - 0.5) < 0.08


def test_dataset_files_and_tokenizer(tmp_path):
    make_synthdoc_dataset(tmp_path, CFG, 6, seed=3, eval_pages=2, drill_rows=3, task=TASK)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["task"] == "synthdoc-order" and meta["rows"] == {"mixed": 6, "drill": 3, "easy": 2, "missing": 2,
                                                                  "order": 8, "above": 4}
    row = json.loads((tmp_path / "data.jsonl").read_text().splitlines()[0])
    assert len(row["conversations"]) == 16 and row["conversations"][0]["value"].startswith("<image>\n")
    drill = json.loads((tmp_path / "drill.jsonl").read_text().splitlines()[0])
    assert "image" not in drill and all("<image>" not in t["value"] for t in drill["conversations"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = tok.encode("is the red above the blue ? which colour is missing nothing").ids
    assert max(ids) < CFG.decoder.vocab_size and tok.token_to_id("[UNK]") not in ids


def test_a_tile_side_the_layout_cannot_use_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        render_order_page(random.Random(0), 20)


def test_answer_refuses_a_foreign_question():
    with pytest.raises(ValueError, match="not a question of the order task"):
        answer({"background": "white", "stamps": {}}, "what pattern is at the top left ?")


def test_the_cross_attention_only_visual_stream_is_row_blind():
    """The tower's tokens of a page's tiles are its row-swapped twin's, in swapped rows.

    With the glance taken from the first page (it differs by resize rounding only, tested above),
    the two visual streams differ only in the order of the tile rows: what the text reads under
    CA-only (a set, plus a convolution that reaches three tokens, less than one row) is the same.
    """
    model = zoo.build("visor-synthdoc-tiny").eval()
    processor = zoo.processor_for(model)
    image, _ = render_order_page(random.Random(5), TILE)
    page = np.asarray(image)
    swapped = Image.fromarray(np.concatenate([page[TILE:], page[:TILE]]))
    a = processor.preprocess(["<image>"], [image], None)[0]
    b = processor.preprocess(["<image>"], [swapped], None)[0]
    b["pixel_values"][0, 0] = a["pixel_values"][0, 0]
    with torch.no_grad():
        tiles_a = model.vision_tower(a["pixel_values"][0])
        tiles_b = model.vision_tower(b["pixel_values"][0])
    grid = lambda t: t[1:].reshape(2, 2, *t.shape[1:])  # noqa: E731 - [row, col, tokens, dim]
    assert torch.equal(grid(tiles_a)[0], grid(tiles_b)[1]) and torch.equal(grid(tiles_a)[1], grid(tiles_b)[0])


def test_the_probe_variants_are_well_formed():
    """benchmarks/synthdoc_order_probe.py's variants: every word known, answers true to the page."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from synthdoc_order_probe import VARIANTS

    for name, (task, overrides) in VARIANTS.items():
        assert all(o.startswith("training.") for o in overrides), name
        for _, facts, qa in pages(2, 5, TILE, task):
            assert {c for c, _, _ in qa} == set(task.categories), name
            for category, question, truth in qa:
                assert set(question.split()) | {truth} <= set(task.words), (name, question)
                if category == "missing":
                    assert truth not in facts["stamps"].values() and truth in task.words
                if category in ("order", "above", "find", "missing"):
                    assert answer(facts, question) == truth
                if category == "row":
                    ink = question.removeprefix("which row is the ").removesuffix(" in ?")
                    assert next(w for w, n in facts["stamps"].items() if n == ink).split()[0] == truth
                if category == "place":
                    assert facts["stamps"][question.removeprefix("what colour is at the ").removesuffix(" ?")] == truth


def test_a_checkpoint_names_its_synthdoc_task(tmp_path):
    """``visorlib demo`` asks the weights which task they answer (``synthdoc.json``)."""
    from types import SimpleNamespace

    from visorlib.train.synthdoc import DEFAULT_TASK, task_of

    assert task_of(SimpleNamespace(checkpoint_dir=None)) is DEFAULT_TASK
    assert task_of(SimpleNamespace(checkpoint_dir=str(tmp_path))) is DEFAULT_TASK
    (tmp_path / "synthdoc.json").write_text('{"task": "order"}')
    assert task_of(SimpleNamespace(checkpoint_dir=str(tmp_path))) is TASK
    (tmp_path / "synthdoc.json").write_text('{"task": "nope"}')
    with pytest.raises(ValueError, match="synthdoc.json: unknown synthdoc task 'nope'"):
        task_of(SimpleNamespace(checkpoint_dir=str(tmp_path)))
