"""The ``order`` synthdoc task: questions that only the *order* of the visual tokens answers.

Built to show VISOR's point at a size a CPU trains in minutes: the cheapest configuration
(cross-attention only) answers some questions, and for others a self-attention layer over the
visual tokens is not a luxury but the only way in (docs/synthdoc.md has the measured result).

**The page.** ``2 x 2`` tiles of ``tile`` pixels on a light background; in the middle half of every
tile one *stamp*: a one-pixel checkerboard of an ink colour and its mirror image around mid-grey
(``127 + d`` and ``127 - d``). Four stamps in four different inks of five, so a stamp is named by
its ink ("the red") and exactly one ink is missing. Nothing else is drawn.

**What each view of the page holds.**

* The *glance* (LLaVA-OneVision's base tile: the page shrunk 2x) blurs every checkerboard to the
  same mid-grey square: it shows the background colour and where the stamps are, never which is
  which (measured: the glance of a page and of its rows swapped differ by at most 2 grey levels,
  from the resize's rounding; ``tests/test_synthdoc_order.py``).
* The *tiles* show each stamp's ink exactly, but the vision tower encodes every tile alone with the
  same position embedding, and every tile is drawn the same way: a tile's tokens know *which* stamp
  they show, not *where* on the page it is.
* Only the *sequence* says where: the tiles' tokens come row by row (with a newline token ending
  every row), so a top stamp's tokens come before a bottom stamp's.

**Why cross-attention alone cannot answer "is the red above the blue ?".** Under the CA-only
configuration the visual tokens are never updated by the language model, and cross-attention has
no rotary position: the text sees the visual tokens as a *set*. The one positional signal a
cross-attention block has is its depth-wise convolution over the visual sequence, which reaches
three tokens to either side: enough to see a row's newline (so a stamp's column is known) and the
neighbouring stamp in the same row, never a stamp in another row (a row is nine tokens, stamps of
two rows are at least 18 apart, and the margins keep every stamp token three tokens away from the
image's first and last token). Swapping the page's two rows of tiles therefore changes nothing the
CA-only text can see, while it flips the answer of every ``order`` and ``above`` question; the page
distribution is symmetric under the swap, so **no CA-only model can beat 0.5 on them**
(:func:`row_blind_bound` checks this on the held-out pages). **Measured caveat:** the glance is not
exactly row-blind. The resize cancels a checkerboard inside a stamp but not at its edges, so the
glance's stamp edges keep a faint (at most 2 grey levels), ink-dependent trace, and each glance
token knows its place. A CA-only model trained alone used it: 0.63 on 400 held-out ``order``
questions (docs/synthdoc.md, "A third attempt"). The bound is exact only for a reader that ignores
that trace. A self-attention layer attends over the
sequence with rotary positions and causally, so a bottom stamp's tokens can see what came before
them: the rows.

Question kinds (the ``category`` of a row):

* ``easy`` — "what colour is the background ?": the glance answers it.
* ``missing`` — "which colour is missing ?": the ink on no stamp; the tiles answer it, no place
  needed (the average of all visual tokens holds it, so it needs no lookup either).
* ``order`` — "is the red above the blue ?" (asked only of stamps in different rows): needs rows.
* ``above`` — "what colour is above the red ?" (an ink, or ``nothing`` for a top stamp): needs the
  row *and* the column: the hardest kind.

A training row asks eight questions about one page (one easy, one missing, four order, two above)
in a random order. Everything is a pure function of the seed. (A first version asked "is there a
red ?" instead of the missing ink, with six inks; no lookup formed on it in 2000 dense steps:
``benchmarks/synthdoc_order_probe.py``, variant ``find``.)
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from .synthdoc_stamps import BACKGROUNDS, INKS, QUADRANTS

CATEGORIES = ("easy", "missing", "order", "above")
#: Stamp names: five of the stamps task's inks (four stamps a page, so exactly one is missing).
NAMES = tuple(INKS)[:5]
#: Largest per-channel distance of a stamp's two colours from mid-grey: small enough that the
#: glance's resize rounding is the only difference between stamps there (<= 2 grey levels), large
#: enough that a patch embedding tells six inks apart at once.
CONTRAST = 48
MID = 127
WORDS = ("what which colour is the background missing ? a yes no above nothing".split() + list(BACKGROUNDS)
         + list(NAMES))


def stamp_colours(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The two colours of stamp ``name``'s checkerboard: ``MID + d`` and ``MID - d``.

    ``d`` is the ink's offset from mid-grey scaled to at most :data:`CONTRAST` per channel, so
    the two average to the same grey for every stamp.
    """
    offset = np.asarray(INKS[name], float) - MID
    offset = np.round(offset * CONTRAST / np.abs(offset).max())
    return (MID + offset).astype(np.uint8), (MID - offset).astype(np.uint8)


def stamp_box(quadrant: int, tile: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the middle half of the quadrant's tile (a one-patch margin at 32 px)."""
    margin = tile // 4
    row, col = divmod(quadrant, 2)
    x0, y0 = col * tile + margin, row * tile + margin
    return x0, y0, x0 + tile // 2, y0 + tile // 2


def render_order_page(rng: random.Random, tile: int, names: tuple[str, ...] = NAMES) -> tuple[Image.Image, dict]:
    """One page and its facts: ``{"background": name, "stamps": {quadrant: ink name}}``.

    ``names``: the inks the four stamps are drawn from (any of the stamps task's inks).
    """
    if tile < 16 or tile % 8:
        raise ValueError(f"the order task needs a tile side that is a multiple of 8 and >= 16 px, got {tile}")
    background = rng.choice(list(BACKGROUNDS))
    names = rng.sample(names, len(QUADRANTS))
    page = np.empty((2 * tile, 2 * tile, 3), np.uint8)
    page[:] = BACKGROUNDS[background]
    y, x = np.mgrid[0:tile // 2, 0:tile // 2]
    on = (x + y) % 2 == 0  # stamps start on even pixels, so every stamp's checker has one phase
    for quadrant, name in enumerate(names):
        x0, y0, x1, y1 = stamp_box(quadrant, tile)
        ink, mirror = stamp_colours(name)
        region = page[y0:y1, x0:x1]
        region[on], region[~on] = ink, mirror
    return Image.fromarray(page), {"background": background, "stamps": dict(zip(QUADRANTS, names, strict=True))}


def order_questions(facts: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """The eight ``(category, question, answer)`` of a training page, in a random order."""
    stamps = facts["stamps"]
    out = [("easy", "what colour is the background ?", facts["background"]),
           ("missing", "which colour is missing ?", missing_ink(facts))]
    out += located_questions(stamps, rng)
    rng.shuffle(out)
    return out


def located_questions(stamps: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """The page's four ``order`` and two ``above`` questions (in this order; the caller shuffles).

    Every (top, bottom) pair once, asked one way or the other, so yes and no come equally often;
    ``above`` of two random stamps, so ``nothing`` (a top stamp) is half the answers.
    """
    out = []
    for top in ("top left", "top right"):
        for bottom in ("bottom left", "bottom right"):
            if rng.random() < 0.5:
                out.append(("order", f"is the {stamps[top]} above the {stamps[bottom]} ?", "yes"))
            else:
                out.append(("order", f"is the {stamps[bottom]} above the {stamps[top]} ?", "no"))
    for where in rng.sample(QUADRANTS, 2):
        row, column = where.split()
        answer = stamps[f"top {column}"] if row == "bottom" else "nothing"
        out.append(("above", f"what colour is above the {stamps[where]} ?", answer))
    return out


def missing_ink(facts: dict) -> str:
    """The one ink of :data:`NAMES` on no stamp of the page."""
    return next(name for name in NAMES if name not in facts["stamps"].values())


#: The reading drill's page facts: text-only rows answered as if about this page.
DRILL = {"background": "white", "stamps": dict(zip(QUADRANTS, ("black", "red", "blue", "green"), strict=True))}


def describe(facts: dict) -> str:
    """``background cyan; top left: green, top right: black, ...``"""
    return f"background {facts['background']}; " + ", ".join(f"{w}: {n}" for w, n in facts["stamps"].items())


def swap_rows(facts: dict) -> dict:
    """The facts of the same page with its two rows of tiles swapped."""
    stamps = facts["stamps"]
    flipped = {f"{'bottom' if where.startswith('top') else 'top'} {where.split()[1]}": name
               for where, name in stamps.items()}
    return {**facts, "stamps": {where: flipped[where] for where in QUADRANTS}}


def answer(facts: dict, question: str) -> str:
    """The answer to one of this task's questions about the page ``facts`` describe."""
    stamps = facts["stamps"]
    place = {name: where for where, name in stamps.items()}
    words = question.rstrip(" ?").split()
    if question.startswith("what colour is the background"):
        return facts["background"]
    if question == "which colour is missing ?":
        return missing_ink(facts)
    if question.startswith("is there a"):
        return "yes" if words[-1] in place else "no"
    if question.startswith("is the"):
        first, second = words[2], words[-1]
        return "yes" if place[first].startswith("top") and place[second].startswith("bottom") else "no"
    if question.startswith("what colour is above the"):
        row, column = place[words[-1]].split()
        return stamps[f"top {column}"] if row == "bottom" else "nothing"
    raise ValueError(f"not a question of the order task: {question!r}")


def row_blind_bound(page_facts: list[dict], questions: list[list[tuple[str, str, str]]]) -> dict[str, float]:
    """The best accuracy a reader blind to the page's rows can expect, per question kind.

    Such a reader (every CA-only model; module docstring) sees a page and its row-swapped twin
    identically, and both are equally likely, so on a question whose answer the swap changes it
    is right on at most one of the two: 0.5; elsewhere 1. Averaged over the given pages' questions.
    """
    scores: dict[str, list[float]] = {}
    for facts, qa in zip(page_facts, questions, strict=True):
        twin = swap_rows(facts)
        for category, question, truth in qa:
            if answer(facts, question) != truth:
                raise AssertionError(f"answer() disagrees with the generator on {question!r}")
            scores.setdefault(category, []).append(1.0 if answer(twin, question) == truth else 0.5)
    return {category: sum(v) / len(v) for category, v in scores.items()}
