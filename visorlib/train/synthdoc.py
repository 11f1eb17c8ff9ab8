"""``synthdoc``: a synthetic document task a tiny model learns from scratch on a CPU.

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

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import ModelConfig

#: A page layout: ``(rng, tile) -> (image, facts)`` with the facts :func:`render_page` returns.
Renderer = Callable[[random.Random, int], tuple[Image.Image, dict]]

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
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


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


#: The reading drill's answer key: what a text-only question (no page) is answered with. Arbitrary,
#: but fixed and different per question, so answering it needs the question's words (see
#: :func:`drill_turns`).
DRILL = {"background": "white", "ink": "black",
         "patterns": dict(zip(QUADRANTS, ("vertical", "horizontal", "checker", "dots"), strict=True))}


def drill_turns(rng: random.Random) -> list[tuple[str, str, str]]:
    """The seven questions of a text-only *reading drill* row, answered from :data:`DRILL`.

    A decoder trained from scratch must find the one word that tells the questions apart
    ("background" / "ink", "top left" / "bottom right") among about a hundred visual tokens, and
    measured, it did not: a 4000-step dense run answered every background question with the ink
    colour and every pattern question with whatever pattern was most common on the page. Without
    the page the same model learns to read those words in about 75 steps, and keeps reading them
    when pages come back (docs/synthdoc.md). Drill rows are that: the usual questions with no
    page and a fixed answer key.
    """
    return all_questions(DRILL, rng)


def pages(seed: int, count: int, tile: int, same_share: float = 0.0, render: Renderer | None = None
          ) -> Iterator[tuple[Image.Image, dict, list[tuple[str, str, str]]]]:
    """``count`` pages of seed ``seed``: ``(image, facts, questions)``, deterministic.

    ``render(rng, tile)`` draws another page layout with the same facts and questions (default:
    :func:`render_page` with ``same_share``); ``benchmarks/synthdoc_unmarked.py`` uses it.
    """
    rng = random.Random(f"synthdoc-{seed}")
    for _ in range(count):
        image, facts = render_page(rng, tile, same_share) if render is None else render(rng, tile)
        yield image, facts, all_questions(facts, rng)


def vocabulary() -> list[str]:
    """Every word a synthdoc prompt or answer uses."""
    return [*QUESTION_WORDS, *BACKGROUNDS, *INKS, *PATTERNS]


def write_tokenizer(folder: Path, cfg: ModelConfig) -> Path:
    """A word-level ``tokenizer.json`` over the task's words with the card's special ids."""
    from .synth import write_word_level_tokenizer

    specials = {"<|endoftext|>": cfg.tokens.pad_token_id, "<image>": cfg.tokens.image_token_id,
                "<video>": cfg.tokens.video_token_id, "<|im_end|>": cfg.tokens.eos_token_ids[0]}
    words = ["<|im_start|>", "[UNK]", "user", "assistant", "system", *vocabulary()]
    return write_word_level_tokenizer(folder, cfg, specials, words, SPECIALS)


def make_synthdoc_dataset(folder: str | Path, cfg: ModelConfig, pages_count: int = 2000, seed: int = 0,
                          eval_pages: int | None = None, same_share: float = 0.0, drill_rows: int = 0,
                          render: Renderer | None = None) -> Path:
    """Write a synthdoc split to ``folder``; returns the training JSONL path.

    Files written: ``images/page_XXXXX.png``; ``data.jsonl`` (one seven-turn conversation per page,
    ``category: "mixed"``); ``easy.jsonl``, ``hard.jsonl``, ``pair.jsonl`` (one question per row,
    the same seven questions of the first ``eval_pages`` pages); ``drill.jsonl`` (``drill_rows``
    text-only reading-drill conversations, see :func:`drill_turns`; only when ``drill_rows > 0``);
    ``tokenizer.json``; ``meta.json`` (seed, tile, counts).

    Args:
        folder: Output folder (created).
        cfg: The model card the data is for: its tile side (``vision.image_size``) sets the page
            size and its special ids go into the tokenizer.
        pages_count: Pages to render.
        seed: Everything is reproducible from it; use a seed never trained on for held-out data.
        eval_pages: Pages that also get single-question rows (default: all).
        same_share: Share of pages whose four stamps share one pattern (see :func:`render_page`).
        drill_rows: Text-only reading-drill rows to write to ``drill.jsonl``.
        render: Another page layout (see :func:`pages`).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tile = cfg.vision.image_size
    eval_pages = pages_count if eval_pages is None else eval_pages
    mixed: list[dict] = []
    single: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for index, (image, _, qa) in enumerate(pages(seed, pages_count, tile, same_share, render)):
        name = f"images/page_{index:05d}.png"
        image.save(folder / name)
        conversation = []
        for turn, (_, question, answer) in enumerate(qa):
            prompt = f"<image>\n{question}" if turn == 0 else question
            conversation += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        mixed.append({"id": f"{index}", "image": name, "category": "mixed", "conversations": conversation})
        if index < eval_pages:
            for position, (category, question, answer) in enumerate(qa):
                single[category].append({
                    "id": f"{index}-{position}", "image": name, "category": category, "page": index,
                    "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                      {"from": "gpt", "value": answer}],
                })
    _write_jsonl(folder / "data.jsonl", mixed)
    if drill_rows:
        rng = random.Random(f"synthdoc-drill-{seed}")
        drill = [{"id": f"drill-{index}", "category": "drill",
                  "conversations": [{"from": who, "value": text} for _, question, answer in drill_turns(rng)
                                    for who, text in (("human", question), ("gpt", answer))]}
                 for index in range(drill_rows)]
        _write_jsonl(folder / "drill.jsonl", drill)
    for category, rows in single.items():
        _write_jsonl(folder / f"{category}.jsonl", rows)
    write_tokenizer(folder, cfg)
    meta = {"task": "synthdoc", "seed": seed, "same_share": same_share, "tile": tile, "page_size": 2 * tile, "pages": pages_count,
            "rows": {"mixed": len(mixed), "drill": drill_rows, **{c: len(r) for c, r in single.items()}}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / "data.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


# -- scoring --------------------------------------------------------------------------------------


def encode_question(processor, image: Image.Image, question: str, answer: str) -> dict:
    """One single-question sample (``input_ids``, ``labels`` on the answer, pixels) for scoring."""
    return processor.encode_turns([("user", f"<image>\n{question}"), ("assistant", answer)], [image])


def held_out_questions(processor, seed: int, count: int, render: Renderer | None = None) -> dict[str, list[dict]]:
    """Encoded single-question samples of ``count`` pages of ``seed``, per category.

    Every page gives its seven training-style questions (both easy ones, the hard one for each
    quadrant, one pair), so the categories have ``2 * count``, ``4 * count`` and ``count`` samples.
    """
    out: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for image, _, qa in pages(seed, count, processor.cfg.vision.image_size, render=render):
        for category, question, answer in qa:
            sample = encode_question(processor, image, question, answer)
            sample["category"], sample["question"], sample["answer"] = category, question, answer
            out[category].append(sample)
    return out


def score_samples(model, samples: list[dict], sa_layers, batch_size: int = 32) -> tuple[list[bool], list]:
    """Per sample: is every answer token (and the end-of-turn token) the model's argmax?

    Teacher-forced greedy exact match, the criterion :func:`visorlib.train.router.log_configurations`
    uses for pseudo-labels; with one answer per sample it equals greedy decoding's exact match.

    Returns:
        ``(correct, configurations)``: one bool and the configuration each sample ran (the
        router's choice under ``sa_layers="router"``; None for a dense model).
    """
    import torch

    from ..data.conversations import collate

    hits: list[bool] = []
    configs: list = []
    pad = model.cfg.tokens.pad_token_id
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start:start + batch_size], pad)
            batch.pop("batch_num_images", None)
            labels = model.language_model.supervised_labels(batch["input_ids"], batch.pop("labels"))[:, 1:]
            out = model(**batch, sa_layers=sa_layers)
            ok = (out.logits[:, :-1].argmax(-1) == labels) | (labels == -100)
            hits += ok.all(-1).tolist()
            configs += out.sa_layers if out.sa_layers is not None else [None] * len(ok)
    return hits, configs


# -- command line ---------------------------------------------------------------------------------


def add_data_parser(data_sub) -> None:
    """Register ``visorlib data synthdoc OUT`` under the ``data`` command's subparsers."""
    p = data_sub.add_parser("synthdoc", help="write a split of the synthdoc task (docs/synthdoc.md)")
    p.add_argument("out", help="output folder")
    p.add_argument("--model", default="visor-synthdoc-tiny", help="card whose tile size and token ids are used")
    p.add_argument("--pages", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-share", type=float, default=0.0,
                   help="share of pages whose four stamps share one pattern (curriculum)")
    p.add_argument("--eval-pages", type=int, default=None, help="pages that also get single-question rows")
    p.add_argument("--drill-rows", type=int, default=0,
                   help="text-only reading-drill rows written to drill.jsonl (the first training stage)")
    p.set_defaults(func=_cmd_data)


def _cmd_data(args) -> None:
    from .. import zoo

    if args.pages < 1:
        raise ValueError(f"data synthdoc: --pages must be >= 1, got {args.pages}")
    if args.eval_pages is not None and not 0 <= args.eval_pages <= args.pages:
        raise ValueError(f"data synthdoc: --eval-pages must be in [0, --pages={args.pages}], got {args.eval_pages}")
    if args.drill_rows < 0:
        raise ValueError(f"data synthdoc: --drill-rows must be >= 0, got {args.drill_rows}")
    if not 0 <= args.same_share <= 1:
        raise ValueError(f"data synthdoc: --same-share must be in [0, 1], got {args.same_share}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"data synthdoc: output {out} exists and is not a folder")
    path = make_synthdoc_dataset(out, zoo.get_config(args.model), args.pages, args.seed, args.eval_pages,
                                 same_share=args.same_share, drill_rows=args.drill_rows)
    print(f"wrote {path} ({args.pages} pages, seed {args.seed}), easy/hard/pair.jsonl and tokenizer.json")
