"""Why a synthdoc model gets what it gets wrong: does it read the question, and can its tower see?

Two measurements behind docs/synthdoc.md's "What held the model back":

1. **Does the model read the question?** On held-out pages (seed ``visorlib.demo.HELD_OUT_SEED``):
   how often a colour question gets a word of the asked kind (a background name for the
   background question, an ink name for the ink question: 0.5 each means the question word is
   ignored); how far apart the answer distributions of the two colour questions about the same
   page are (total variation; 0 = the word "background" vs "ink" changes nothing); and, for the
   pattern questions, how often the answer is the pattern most frequent on the page whichever
   place was asked (the shortcut of a model that does not read "top left").
2. **Can the vision tower see the page?** A linear probe (logistic regression, 400 training pages,
   200 test pages) from the projector's features of a *randomly initialised* ``synthdoc-tiny``
   (and of the given model) to the background colour, the ink colour and the top-left pattern.

    OMP_NUM_THREADS=1 python benchmarks/synthdoc_diagnose.py [--model synthdoc-tiny | FOLDER] \\
        [--json benchmarks/results/synthdoc-diagnose.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visorlib import zoo  # noqa: E402
from visorlib.data.conversations import collate  # noqa: E402
from visorlib.demo import HELD_OUT_SEED  # noqa: E402
from visorlib.train.synthdoc import TASKS, encode_question, pages  # noqa: E402
from visorlib.train.synthdoc_stamps import BACKGROUNDS, INKS, PATTERNS, QUADRANTS  # noqa: E402


def _first_answer_distribution(model, samples: list[dict]) -> torch.Tensor:
    """``[N, vocab]`` softmax at the position that predicts each sample's first answer token."""
    batch = collate(samples, model.cfg.tokens.pad_token_id)
    batch.pop("batch_num_images", None)
    labels = model.language_model.supervised_labels(batch["input_ids"], batch.pop("labels"))[:, 1:]
    with torch.inference_mode():
        logits = model(**batch).logits[:, :-1]
    first = (labels != -100).float().argmax(-1)
    return logits[torch.arange(len(samples)), first].float().softmax(-1)


def reads_the_question(model, processor, seed: int = HELD_OUT_SEED, count: int = 60) -> dict:
    """The question-reading measurements (1. in the module docstring) on ``count`` pages."""
    vocab = {word: processor.tokenizer.token_to_id(word) for word in (*BACKGROUNDS, *INKS, *PATTERNS)}
    ids = {kind: torch.tensor([vocab[w] for w in words]) for kind, words in
           (("background", BACKGROUNDS), ("ink", INKS), ("pattern", PATTERNS))}
    model.eval()
    drawn = list(pages(seed, count, model.cfg.vision.image_size, TASKS["stamps"]))
    colour = {kind: [encode_question(processor, image, f"what colour is the {kind} ?", facts[kind])
                     for image, facts, _ in drawn] for kind in ("background", "ink")}
    dist = {kind: _first_answer_distribution(model, samples) for kind, samples in colour.items()}
    kind_right = {kind: float(torch.isin(dist[kind].argmax(-1), ids[kind]).float().mean()) for kind in dist}
    variation = float(0.5 * (dist["background"] - dist["ink"]).abs().sum(-1).mean())
    hard = [(image, facts, where) for image, facts, _ in drawn for where in QUADRANTS]
    samples = [encode_question(processor, image, f"what pattern is at the {where} ?", facts["patterns"][where])
               for image, facts, where in hard]
    chosen = _first_answer_distribution(model, samples).argmax(-1).tolist()
    inverse = {vocab[w]: w for w in PATTERNS}
    modal = correct = 0
    for (_, facts, where), token in zip(hard, chosen, strict=True):
        counts = Counter(facts["patterns"].values())
        answer = inverse.get(token)
        modal += answer is not None and counts[answer] == max(counts.values())
        correct += answer == facts["patterns"][where]
    return {"pages": count, "colour_answer_of_the_asked_kind": kind_right,
            "colour_questions_total_variation": round(variation, 4),
            "hard_accuracy": correct / len(hard), "hard_answer_is_a_most_frequent_pattern": modal / len(hard)}


def probe(features: torch.Tensor, target: torch.Tensor, train: int = 400) -> float:
    """Held-out accuracy of a logistic regression from ``features`` to ``target``."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], int(target.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(x[:train] @ weight + bias, target[:train]) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[train:] @ weight + bias).argmax(-1) == target[train:]).float().mean())


def tower_probe(model, processor, seed: int = 11, count: int = 600) -> dict:
    """Linear probes (2. in the module docstring) of ``model``'s projector features."""
    drawn = list(pages(seed, count, model.cfg.vision.image_size, TASKS["stamps"]))
    pixels = torch.stack([processor.preprocess(None, [image], None)[0]["pixel_values"][0] for image, _, _ in drawn])
    with torch.inference_mode():
        tiles = model._tile_features(pixels.flatten(0, 1)).reshape(count, pixels.shape[1], -1, model.cfg.decoder.hidden_size)
    page_mean, top_left = tiles.mean((1, 2)), tiles[:, 1].mean(1)  # tile 0 is the base tile, 1 the top-left
    target = {"background": [list(BACKGROUNDS).index(f["background"]) for _, f, _ in drawn],
              "ink": [list(INKS).index(f["ink"]) for _, f, _ in drawn],
              "top_left_pattern": [list(PATTERNS).index(f["patterns"]["top left"]) for _, f, _ in drawn]}
    return {"background_from_page_mean": probe(page_mean, torch.tensor(target["background"])),
            "ink_from_page_mean": probe(page_mean, torch.tensor(target["ink"])),
            "top_left_pattern_from_its_tile": probe(top_left, torch.tensor(target["top_left_pattern"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthdoc-tiny", help="zoo name (packaged weights) or checkpoint folder")
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model in zoo.list_models():
        model = zoo.build(args.model, pretrained=True)
    else:
        model = zoo.from_pretrained(args.model)
    processor = zoo.processor_for(model)
    random_init = zoo.instantiate(zoo.get_config("synthdoc-tiny")).eval()
    result = {"model": args.model, "held_out_seed": HELD_OUT_SEED,
              "reads_the_question": reads_the_question(model, processor, count=args.pages),
              "tower_probe": {"trained": tower_probe(model.eval(), processor),
                              "random_init": tower_probe(random_init, processor)}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
