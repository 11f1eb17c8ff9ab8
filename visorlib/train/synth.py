"""A synthetic fine-grained VQA task that trains and evaluates on a CPU in minutes.

Each page has a background colour, a few outlined boxes and words rendered at random places and
sizes; one small word sits in each corner region. Questions come in two kinds:

* **easy** (coarse, one glance at the image): "what colour is the background ?", "how many boxes
  are there ?";
* **hard** (fine-grained): "what word is in the top left ?" — read small text at a described place.

This mirrors the paper's split into easy tasks (little text-image interaction) and hard ones
(document-style reading), so the benefit of executed self-attention layers can be measured
without GPUs. The folder it writes holds ``data.jsonl`` (LLaVA conversation format, with a
``category`` field), ``images/`` and a word-level ``tokenizer.json`` whose special ids agree with
the model card it was made for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..config import ModelConfig

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "gray": (128, 128, 128), "orange": (235, 130, 30), "purple": (130, 50, 160)}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
WORDS = ("apple bird cake door fish gold hill iron jazz kite lamp moon nest oak pear queen rose sand tree "
         "vase wolf yarn zinc arch bell coin drum echo fern gate harp ink jade knot leaf mint note opal pine "
         "quilt reed silk tide urn vine wave yak zest").split()
CORNERS = {"top left": (0.0, 0.0), "top right": (0.5, 0.0), "bottom left": (0.0, 0.5), "bottom right": (0.5, 0.5)}
QUESTION_WORDS = "what colour is the background how many boxes are there word in top bottom left right ?".split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
#: Largest page side: a page is drawn in memory (RGB, plus PIL's working copies), so 100000 px
#: asked for tens of GB and the process was killed with no message. 4096 is beyond any tile grid.
MAX_IMAGE_SIZE = 4096


def _ink(background: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if sum(background) > 360 else (255, 255, 255)


def render_page(rng: random.Random, size: int) -> tuple[Any, dict]:
    """One page (a PIL image) and the facts the questions ask about."""
    # PIL's drawing modules load here, not with the module: `visorlib --help` imports this file for
    # MAX_IMAGE_SIZE (its --image-size bound) and should not pay for them.
    from PIL import Image, ImageDraw, ImageFont

    colour = rng.choice(list(COLOURS))
    image = Image.new("RGB", (size, size), COLOURS[colour])
    draw = ImageDraw.Draw(image)
    ink = _ink(COLOURS[colour])
    boxes = rng.randint(1, 4)
    for _ in range(boxes):
        x0, y0 = rng.randint(0, size * 3 // 4), rng.randint(0, size * 3 // 4)
        w, h = rng.randint(size // 10, size // 4), rng.randint(size // 10, size // 4)
        box_colour = rng.choice([c for name, c in COLOURS.items() if name != colour])
        draw.rectangle((x0, y0, x0 + w, y0 + h), outline=box_colour, width=max(2, size // 100))
    for _ in range(rng.randint(3, 8)):  # distractor text of varying size in the middle band
        font = ImageFont.load_default(size=rng.randint(size // 40 + 6, size // 12 + 8))
        draw.text((rng.randint(size // 8, size // 2), rng.randint(size // 3, size // 2)), rng.choice(WORDS),
                  font=font, fill=ink)
    corners = {}
    small = ImageFont.load_default(size=max(8, size // 32))
    for name, (fx, fy) in CORNERS.items():
        word = rng.choice(WORDS)
        x = int(fx * size + rng.uniform(0.03, 0.25) * size)
        y = int(fy * size + rng.uniform(0.03, 0.2) * size)
        draw.text((x, y), word, font=small, fill=ink)
        corners[name] = word
    return image, {"colour": colour, "boxes": boxes, "corners": corners}


def questions(facts: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """``(category, question, answer)`` triples about one page."""
    corner = rng.choice(list(CORNERS))
    return [
        ("easy", "what colour is the background ?", facts["colour"]),
        ("easy", "how many boxes are there ?", NUMBER_WORDS[facts["boxes"]]),
        ("hard", f"what word is in the {corner} ?", facts["corners"][corner]),
    ]


def write_tokenizer(folder: Path, cfg: ModelConfig) -> Path:
    """A word-level tokenizer over the task's vocabulary, with the card's special ids."""
    import re

    from ..models import family_of

    processor = family_of(cfg).processor(cfg, None)
    specials = {"<|endoftext|>": cfg.tokens.pad_token_id, processor.image_token: cfg.tokens.image_token_id,
                processor.video_token: cfg.tokens.video_token_id}
    # The family's own markup tokens (Qwen2-VL's <|vision_start|> ...) must stay single tokens too.
    markup = re.findall(r"<\|[a-z_]+\|>", processor.data_image + processor.data_video)
    eos = cfg.tokens.eos_token_ids[0]
    specials["<|im_end|>"] = eos
    system = (processor.default_system or "").split()
    words = ["<|im_start|>", *markup, "[UNK]", "user", "assistant", "system", *system, *QUESTION_WORDS, *COLOURS,
             *NUMBER_WORDS, *WORDS]
    return write_word_level_tokenizer(folder, cfg, specials, words, list(dict.fromkeys([*SPECIALS, *specials, *markup])))


def write_word_level_tokenizer(folder: Path, cfg: ModelConfig, specials: dict[str, int], words: list[str],
                               special_tokens: list[str]) -> Path:
    """Write ``folder/tokenizer.json``: whitespace-split words, ``specials`` at the card's ids.

    The synthetic tasks' tokenizers: every word gets the next id the card leaves free (its special
    ids and the router's routing id are never reused), so the same card and word list always give
    the same ids.

    Args:
        folder: Where ``tokenizer.json`` goes (created if missing).
        cfg: The card the ids must agree with.
        specials: ``{token: id}`` fixed by the card.
        words: The rest of the vocabulary, in id order (duplicates and specials are skipped).
        special_tokens: Tokens never split by the pre-tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = dict(specials)
    taken = set(vocab.values())
    if cfg.visor is not None:
        taken.add(cfg.visor.routing_token_id)
    next_id = 0
    for word in words:
        if word in vocab:
            continue
        while next_id in taken:
            next_id += 1
        vocab[word] = next_id
        taken.add(next_id)
    if max(vocab.values()) >= cfg.decoder.vocab_size:
        raise ValueError(f"the task's vocabulary needs {max(vocab.values()) + 1} token ids; {cfg.name} has "
                         f"{cfg.decoder.vocab_size}")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(special_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def make_synthetic_dataset(folder: str | Path, cfg: ModelConfig, samples: int = 200, image_size: int = 96,
                           seed: int = 0) -> Path:
    """Write ``samples`` pages (three questions each) to ``folder``; returns the JSONL path.

    Args:
        folder: Output folder (created).
        cfg: The model card the data is for (its special token ids go into the tokenizer).
        samples: Pages to render.
        image_size: Page side in pixels (a tiny model's tiles are 30 px; real ones 384 px).
        seed: Everything is reproducible from it.

    Raises:
        ValueError: ``samples`` < 1, or ``image_size`` < 32 (nothing legible) or above
            :data:`MAX_IMAGE_SIZE` (a memory blow-up), checked before anything is allocated.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"synthetic dataset: samples must be an integer >= 1, got {samples!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"synthetic dataset: image_size must be an integer from 32 to {MAX_IMAGE_SIZE} pixels, "
                         f"got {image_size!r}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(samples):
        image, facts = render_page(rng, image_size)
        name = f"images/page_{index:05d}.png"
        image.save(folder / name)
        for q_index, (category, question, answer) in enumerate(questions(facts, rng)):
            rows.append({
                "id": f"{index}-{q_index}",
                "image": name,
                "category": category,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            })
    path = folder / "data.jsonl"
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    write_tokenizer(folder, cfg)
    return path
