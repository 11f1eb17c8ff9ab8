"""``synthdoc``: synthetic document tasks a tiny model learns from scratch on a CPU.

A synthdoc *task* draws ``2 x 2``-tile pages (the tile size of the model card, so LLaVA-OneVision's
anyres picks the ``2 x 2`` grid and nothing is resampled) and asks questions about them with a
small word vocabulary. Two tasks are registered in :data:`TASKS`:

* ``stamps`` (:mod:`visorlib.train.synthdoc_stamps`, the default: the shipped model's task):
  one patterned stamp per tile and a border that tells each tile where it is. Cross-attention
  alone answers every one of its questions.
* ``order`` (:mod:`visorlib.train.synthdoc_order`): stamps that only the order of the visual
  tokens places, so two of its question kinds provably need a self-attention layer. Designed to
  show VISOR's point; measured, the dense model learns to locate in ~6000 CPU steps but the VISOR
  stages lose it (docs/synthdoc.md), so no shipped model uses it yet.

This module is the machinery both share: the pages of a seed, the dataset files a recipe trains
on (one multi-turn conversation per page, plus one file per question kind for evaluation and
router labels), the text-only *reading drill* rows, the word-level tokenizer, and exact-match
scoring. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..config import ModelConfig
from . import synthdoc_order, synthdoc_stamps

#: A page layout: ``(rng, tile) -> (image, facts)``.
Renderer = Callable[[random.Random, int], tuple[Image.Image, dict]]
#: A page's questions: ``(facts, rng) -> [(category, question, answer), ...]`` in training order.
Questioner = Callable[[dict, random.Random], list[tuple[str, str, str]]]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


@dataclass(frozen=True)
class SynthdocTask:
    """Everything that makes one synthdoc task: how a page looks and what is asked about it.

    Attributes:
        name: The registry key (``visorlib data synthdoc --task NAME``).
        categories: The question kinds, in report order; one evaluation file each.
        words: The vocabulary, in token-id order (the tokenizer gives ids in this order).
        render: Draws a page and its facts.
        questions: The questions of a training page (every kind, in a random order).
        drill: The facts a text-only reading-drill row is answered from (see :func:`drill_turns`).
        seed_names: Format strings (``{seed}``) naming the random sources of pages and drill rows;
            fixed per task so that recorded runs regenerate the same data.
        describe: One line of a page's facts, for people (``visorlib demo``).
    """

    name: str
    categories: tuple[str, ...]
    words: tuple[str, ...]
    render: Renderer
    questions: Questioner
    drill: dict
    seed_names: tuple[str, str]
    describe: Callable[[dict], str]


TASKS = {
    "order": SynthdocTask("order", synthdoc_order.CATEGORIES, tuple(synthdoc_order.WORDS),
                          synthdoc_order.render_order_page, synthdoc_order.order_questions, synthdoc_order.DRILL,
                          ("synthdoc-order-{seed}", "drill-{seed}"), synthdoc_order.describe),
    "stamps": SynthdocTask("stamps", synthdoc_stamps.CATEGORIES, tuple(synthdoc_stamps.WORDS),
                           synthdoc_stamps.render_page, synthdoc_stamps.all_questions, synthdoc_stamps.DRILL,
                           ("synthdoc-{seed}", "synthdoc-drill-{seed}"), synthdoc_stamps.describe),
}
#: The task of the shipped ``synthdoc-tiny`` / ``visor-synthdoc-tiny`` weights.
DEFAULT_TASK = TASKS["stamps"]


def task_of(model) -> SynthdocTask:
    """The synthdoc task a trained model was trained on: its checkpoint's ``synthdoc.json``.

    Shipped synthdoc weights carry ``{"task": NAME}`` beside their config; a model without it
    (random weights, or a checkpoint from before the file existed) is taken to be a
    :data:`DEFAULT_TASK` model.
    """
    folder = getattr(model, "checkpoint_dir", None)
    marker = Path(folder) / "synthdoc.json" if folder else None
    if marker is None or not marker.exists():
        return DEFAULT_TASK
    name = json.loads(marker.read_text()).get("task")
    if name not in TASKS:
        raise ValueError(f"{marker}: unknown synthdoc task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def drill_turns(task: SynthdocTask, rng: random.Random) -> list[tuple[str, str, str]]:
    """The questions of a text-only *reading drill* row, answered from ``task.drill``.

    A decoder trained from scratch must find the one word that tells the questions apart among
    about a hundred visual tokens, and measured, it did not: a 4000-step dense run of the stamps
    task answered every background question with the ink colour. Without the page the same model
    learns to read those words in about 75 steps, and keeps reading them when pages come back
    (docs/synthdoc.md). Drill rows are that: the usual questions with no page and a fixed answer
    key (arbitrary, but different per question, so answering needs the question's words).
    """
    return task.questions(task.drill, rng)


def pages(seed: int, count: int, tile: int, task: SynthdocTask = DEFAULT_TASK
          ) -> Iterator[tuple[Image.Image, dict, list[tuple[str, str, str]]]]:
    """``count`` pages of ``task`` for seed ``seed``: ``(image, facts, questions)``, deterministic."""
    rng = random.Random(task.seed_names[0].format(seed=seed))
    for _ in range(count):
        image, facts = task.render(rng, tile)
        yield image, facts, task.questions(facts, rng)


def write_tokenizer(folder: Path, cfg: ModelConfig, task: SynthdocTask = DEFAULT_TASK) -> Path:
    """A word-level ``tokenizer.json`` over the task's words with the card's special ids."""
    from .synth import write_word_level_tokenizer

    specials = {"<|endoftext|>": cfg.tokens.pad_token_id, "<image>": cfg.tokens.image_token_id,
                "<video>": cfg.tokens.video_token_id, "<|im_end|>": cfg.tokens.eos_token_ids[0]}
    words = ["<|im_start|>", "[UNK]", "user", "assistant", "system", *task.words]
    return write_word_level_tokenizer(folder, cfg, specials, words, SPECIALS)


def make_synthdoc_dataset(folder: str | Path, cfg: ModelConfig, pages_count: int = 2000, seed: int = 0,
                          eval_pages: int | None = None, drill_rows: int = 0,
                          task: SynthdocTask = DEFAULT_TASK) -> Path:
    """Write a split of ``task`` to ``folder``; returns the training JSONL path.

    Files written: ``images/page_XXXXX.png``; ``data.jsonl`` (one multi-turn conversation per
    page with every question of it, ``category: "mixed"``); one ``<kind>.jsonl`` per question kind
    (one question per row, the questions of the first ``eval_pages`` pages); ``drill.jsonl``
    (``drill_rows`` text-only reading-drill conversations, see :func:`drill_turns`; only when
    ``drill_rows > 0``); ``tokenizer.json``; ``meta.json`` (task, seed, tile, counts).

    Args:
        folder: Output folder (created).
        cfg: The model card the data is for: its tile side (``vision.image_size``) sets the page
            size and its special ids go into the tokenizer.
        pages_count: Pages to render.
        seed: Everything is reproducible from it; use a seed never trained on for held-out data.
        eval_pages: Pages that also get single-question rows (default: all).
        drill_rows: Text-only reading-drill rows to write to ``drill.jsonl``.
        task: The synthdoc task (:data:`TASKS`).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tile = cfg.vision.image_size
    eval_pages = pages_count if eval_pages is None else eval_pages
    mixed: list[dict] = []
    single: dict[str, list[dict]] = {c: [] for c in task.categories}
    for index, (image, _, qa) in enumerate(pages(seed, pages_count, tile, task)):
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
        rng = random.Random(task.seed_names[1].format(seed=seed))
        drill = [{"id": f"drill-{index}", "category": "drill",
                  "conversations": [{"from": who, "value": text} for _, question, answer in drill_turns(task, rng)
                                    for who, text in (("human", question), ("gpt", answer))]}
                 for index in range(drill_rows)]
        _write_jsonl(folder / "drill.jsonl", drill)
    for category, rows in single.items():
        _write_jsonl(folder / f"{category}.jsonl", rows)
    write_tokenizer(folder, cfg, task)
    meta = {"task": f"synthdoc-{task.name}", "seed": seed, "tile": tile, "page_size": 2 * tile, "pages": pages_count,
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


def held_out_questions(processor, seed: int, count: int, task: SynthdocTask = DEFAULT_TASK) -> dict[str, list[dict]]:
    """Encoded single-question samples of ``count`` pages of ``seed``, per category.

    Every page gives all its training-style questions (stamps: 2 easy, 4 hard, 1 pair; order:
    1 easy, 2 find, 4 order, 2 above), each as its own sample with the page.
    """
    out: dict[str, list[dict]] = {c: [] for c in task.categories}
    for image, _, qa in pages(seed, count, processor.cfg.vision.image_size, task):
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
    p.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK.name,
                   help="which synthdoc task (docs/synthdoc.md; default: the shipped model's)")
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
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"data synthdoc: output {out} exists and is not a folder")
    task = TASKS[args.task]
    path = make_synthdoc_dataset(out, zoo.get_config(args.model), args.pages, args.seed, args.eval_pages,
                                 drill_rows=args.drill_rows, task=task)
    kinds = "/".join(task.categories)
    print(f"wrote {path} ({args.task} task, {args.pages} pages, seed {args.seed}), {kinds}.jsonl and tokenizer.json")
