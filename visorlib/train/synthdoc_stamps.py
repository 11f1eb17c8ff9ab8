"""The ``stamps`` synthdoc task: the shipped ``visor-synthdoc-tiny``'s task.

A page is ``2 x 2`` tiles with one stamp per tile, filled with one of six ink patterns whose period
(8 px) survives the glance, and a border in the ink colour that tells each tile where it is. Every
question (the background or ink colour, the pattern at a named place, two places at once) is
answered by cross-attention alone: the layout hands location to the vision tower
(docs/synthdoc.md; :mod:`visorlib.train.synthdoc_order` is the task built so that it does not).

The older task in :mod:`visorlib.train.synth` (words at random places, 46 answer words, distractor
text) could not be learnt by a test-size model: its glyphs were smaller than a patch and its pages
were resampled onto the tile grid. This task is built around what a tiny patch-embedding ViT can
see, so that whatever a model gets wrong is the model's fault, not the geometry's:

* **Geometry aligned to the tiles.** A page is exactly ``2 x 2`` tiles (``2 * tile`` pixels per
  side), so LLaVA-OneVision's anyres picks the ``2 x 2`` grid and nothing is resampled. The
  processor's base tile is the whole page shrunk 2x: the "global glance".
* **One stamp per tile, fully inside it.** Each quadrant holds one square *stamp* covering most
  of its tile (a margin of ``tile / 8`` on every side), filled with one of six ink patterns. The
  patterns repeat every :data:`PERIOD` = 8 pixels (one period per patch) in phase with the patch
  grid, so every patch of a stamp sees the same picture: a single linear patch embedding can tell
  the six apart. (A 2-pixel period that the 2x-shrunk base tile blurs away was tried first; the
  tiny model learnt it far more slowly.)
* **A border that says where a tile is.** The vision tower's position embedding is the same in
  every tile, so a tile's tokens do not know which quadrant they show. A 2-pixel border in the ink
  colour runs round the page: each tile sees it on exactly the two sides touching the page edge.
  Without it, hard questions stayed near chance (the model recognised *a* pattern, not *the* one).
* **Small answer sets, no distractors.** Six background colours, six ink colours, six patterns;
  nothing else is drawn on the page.
* **A curriculum knob.** ``same_share`` of the pages repeat one pattern in all four stamps; there
  any tile answers a hard question, which teaches recognising patterns before locating them.

Question kinds (the ``category`` of each row):

* ``easy`` — "what colour is the background ?", "what colour is the ink ?": one glance at the
  base tile answers them.
* ``hard`` — "what pattern is at the top left ?": the fine pattern of one described tile.
* ``pair`` — "what patterns are at the top left and bottom right ?": two answers from two places,
  i.e. more than one look (answer: two words, in the order asked).

Training rows put seven questions about one page (both easy ones, the hard one for each quadrant,
one pair, in a random order) into one multi-turn conversation, so every forward pass trains on all
kinds and every stamp. Evaluation files hold one question per row, one file per category, so accuracy and the router's pseudo-labels
are per kind. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

#: Light backgrounds and dark inks: every (background, ink) pair has strong contrast.
BACKGROUNDS = {"white": (245, 245, 245), "yellow": (240, 220, 90), "pink": (245, 170, 200),
               "cyan": (140, 225, 235), "lime": (170, 235, 120), "beige": (225, 200, 160)}
INKS = {"black": (15, 15, 15), "red": (190, 20, 20), "blue": (20, 40, 190), "green": (10, 120, 30),
        "purple": (110, 20, 140), "brown": (110, 60, 10)}
PATTERNS = ("vertical", "horizontal", "checker", "dots", "grid", "solid")
#: Pattern period in pixels: 4-px ink bands, one per 8-px patch, that survive the base tile's 2x
#: shrink as 2-px bands (see the module docstring for why).
PERIOD = 8
FRAME = 2  # border width in pixels; stamps keep a wider margin, so they never touch it
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CATEGORIES = ("easy", "hard", "pair")
QUESTION_WORDS = "what colour is the background ink pattern patterns are at and top bottom left right ?".split()


def pattern_mask(name: str, size: int, period: int = 2) -> np.ndarray:
    """``[size, size]`` bool: where the ink of pattern ``name`` goes.

    Ink covers the first half of every ``period`` pixels (``period=2``: every other pixel line),
    counted from the stamp's corner, which lies on a multiple of ``period`` in page coordinates.
    """
    y, x = np.mgrid[0:size, 0:size]
    on_x, on_y = (x % period) < period // 2, (y % period) < period // 2
    masks = {
        "vertical": on_x,
        "horizontal": on_y,
        "checker": on_x == on_y,
        "dots": on_x & on_y,
        "grid": on_x | on_y,
        "solid": np.ones((size, size), bool),
    }
    if name not in masks:
        raise ValueError(f"unknown pattern {name!r} (known: {', '.join(PATTERNS)})")
    return masks[name]


def stamp_box(quadrant: int, tile: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the stamp in ``quadrant`` (0..3, row-major): inside that tile only."""
    margin = max(2, tile // 8) // 2 * 2  # even, so the pattern phase stays aligned to the page grid
    row, col = divmod(quadrant, 2)
    x0, y0 = col * tile + margin, row * tile + margin
    return x0, y0, x0 + tile - 2 * margin, y0 + tile - 2 * margin


def render_page(rng: random.Random, tile: int, same_share: float = 0.0) -> tuple[Image.Image, dict]:
    """One ``2*tile``-pixel page and its facts (background, ink, one pattern per quadrant).

    Args:
        rng: The page's random source.
        tile: Tile side in pixels (even, >= 16).
        same_share: Probability that all four quadrants get the same pattern (a curriculum: such
            pages teach recognising patterns before locating them).
    """
    if tile < 16 or tile % 2:
        raise ValueError(f"synthdoc needs an even tile side of at least 16 px, got {tile}")
    background, ink = rng.choice(list(BACKGROUNDS)), rng.choice(list(INKS))
    patterns = [rng.choice(PATTERNS) for _ in QUADRANTS]
    if rng.random() < same_share:
        patterns = [patterns[0]] * len(QUADRANTS)
    page = np.empty((2 * tile, 2 * tile, 3), np.uint8)
    page[:] = BACKGROUNDS[background]
    # The page's border: each tile sees it on exactly the two sides that touch the page edge, which
    # tells a tile where it is (the tower's position embedding is the same in every tile).
    edge = FRAME
    page[:edge], page[-edge:], page[:, :edge], page[:, -edge:] = (INKS[ink],) * 4
    for quadrant, name in enumerate(patterns):
        x0, y0, x1, y1 = stamp_box(quadrant, tile)
        region = page[y0:y1, x0:x1]
        region[pattern_mask(name, x1 - x0, PERIOD)] = INKS[ink]
    facts = {"background": background, "ink": ink, "patterns": dict(zip(QUADRANTS, patterns, strict=True))}
    return Image.fromarray(page), facts


def all_questions(facts: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """The seven ``(category, question, answer)`` of a training page, in a random order.

    Both easy questions, the hard question about each of the four quadrants, and one pair
    question: every page supervises every stamp, which is what a tiny model learns slowest.
    """
    first, second = rng.sample(QUADRANTS, 2)
    patterns = facts["patterns"]
    out = [
        ("easy", "what colour is the background ?", facts["background"]),
        ("easy", "what colour is the ink ?", facts["ink"]),
        *[("hard", f"what pattern is at the {where} ?", patterns[where]) for where in QUADRANTS],
        ("pair", f"what patterns are at the {first} and {second} ?", f"{patterns[first]} {patterns[second]}"),
    ]
    rng.shuffle(out)
    return out


def describe(facts: dict) -> str:
    """``background cyan, ink blue; top left: grid, top right: solid, ...``"""
    stamps = ", ".join(f"{where}: {name}" for where, name in facts["patterns"].items())
    return f"background {facts['background']}, ink {facts['ink']}; {stamps}"


#: The reading drill's answer key: what a text-only question (no page) is answered with. Arbitrary,
#: but fixed and different per question, so answering it needs the question's words (see
#: :func:`drill_turns`).
DRILL = {"background": "white", "ink": "black",
         "patterns": dict(zip(QUADRANTS, ("vertical", "horizontal", "checker", "dots"), strict=True))}


WORDS = (*QUESTION_WORDS, *BACKGROUNDS, *INKS, *PATTERNS)
