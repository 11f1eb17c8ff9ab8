"""Small-scale reproduction on CPU: does VISOR's story hold on the synthetic fine-grained VQA task?

Trains three tiny models from scratch on the same synthetic data (visorlib.train.synth):

* **dense** — the LLaVA-OV architecture at test width with 24 decoder layers;
* **VISOR universal** — the 0.5B card's plan (8 CA + 8 SA candidates) at test width, one of the 13
  configurations sampled per step;
* **VISOR independent** — the same, always trained with 8CA-2SA ``[1, 4]``;

then measures exact-match answer accuracy (greedy = teacher-forced argmax on every answer token) on
held-out pages, split into easy questions (background colour, number of boxes) and hard ones (read
the small word in a named corner), for several configurations. The paper's claims to check: CA-only
is enough for easy questions; hard ones need executed SA layers; one universal network serves all
budgets while an independently trained one only works at its own configuration.

Usage::

    python benchmarks/repro_synthetic.py --steps 300 --json benchmarks/results/repro-synthetic.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

import visorlib
from visorlib.data.conversations import collate
from visorlib.train import Trainer, load_recipe, make_synthetic_dataset

EVAL_CONFIGS = {"CA only (8CA-0SA)": [], "8CA-2SA [1,4]": [1, 4], "8CA-4SA [1,4,7,16]": [1, 4, 7, 16],
                "8CA-7SA [1,4,7,10,16,19,22]": [1, 4, 7, 10, 16, 19, 22], "8CA-8SA (all)": "all"}


def recipe(folder: Path, data: Path, model: dict, training: dict, steps: int, batch: int) -> Path:
    spec = {
        "model": model,
        "data": {"datasets": [{"path": str(data), "format": "synthetic"}], "tokenizer": str(data),
                 "micro_batch_size": batch, "max_length": 4096},
        "optim": {"lr": 2e-3, "warmup_steps": 20, "min_lr_ratio": 0.05},
        "training": {"stage": 2, "global_batch_size": batch, "max_steps": steps, "bf16": False, **training},
        "checkpoint": {"dir": str(folder / "ckpt"), "every_steps": steps + 1, "export_safetensors": False},
        "logging": {"progress": False, "metrics_file": str(folder / "metrics.jsonl")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@torch.inference_mode()
def accuracy(trainer: Trainer, eval_data: Path, sa_layers) -> dict[str, float]:
    """Exact-match accuracy per question category on the held-out pages."""
    from visorlib.data.conversations import ConversationDataset
    from visorlib.data.specs import DatasetSpec

    model = trainer.model.eval()
    dataset = ConversationDataset(DatasetSpec(path=str(eval_data), format="synthetic"), trainer.processor, 4096)
    hits: dict[str, list[bool]] = {"easy": [], "hard": []}
    for start in range(0, len(dataset), 16):
        samples = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
        batch = collate(samples, trainer.processor.tokenizer.pad_token_id or 0)
        labels = model.language_model.supervised_labels(batch["input_ids"], batch.pop("labels"))[:, 1:]
        logits = model(**batch, sa_layers=sa_layers).logits[:, :-1]
        right = (logits.argmax(-1) == labels) | (labels == -100)
        for sample, ok in zip(samples, right.all(-1).tolist(), strict=True):
            hits[sample["category"]].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-pages", type=int, default=400)
    parser.add_argument("--eval-pages", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=90)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="visor-repro-"))
    card = visorlib.get_config("visor-llava-ov-0.5b").tiny()
    train_data = make_synthetic_dataset(work / "train", card, args.train_pages, args.image_size, seed=1).parent
    eval_data = make_synthetic_dataset(work / "eval", card, args.eval_pages, args.image_size, seed=2)
    runs = {
        "dense (24 layers)": ({"name": "llava-ov-0.5b", "tiny": True, "overrides": {"decoder": {"num_layers": 24}}},
                              {"mode": "dense"}, {"dense (all layers)": None}),
        "VISOR universal": ({"name": "visor-llava-ov-0.5b", "tiny": True}, {"mode": "universal"}, EVAL_CONFIGS),
        "VISOR independent [1,4]": ({"name": "visor-llava-ov-0.5b", "tiny": True},
                                    {"mode": "independent", "configuration": [1, 4]},
                                    {k: EVAL_CONFIGS[k] for k in ("8CA-2SA [1,4]", "8CA-7SA [1,4,7,10,16,19,22]")}),
    }
    results = {"settings": vars(args) | {"card": "tiny test-width models (hidden 64; vision 32-wide, 30-px tiles)",
                                        "device": "cpu", "threads": torch.get_num_threads()}, "runs": {}}
    for name, (model, training, configs) in runs.items():
        folder = work / name.replace(" ", "_").replace("[", "").replace("]", "").replace(",", "-")
        folder.mkdir()
        started = time.perf_counter()
        trainer = Trainer(load_recipe(recipe(folder, train_data, model, training, args.steps, args.batch)))
        logs = trainer.train()
        row = {"train_seconds": time.perf_counter() - started, "final_loss": sum(m["loss"] for m in logs[-10:]) / 10,
               "accuracy": {label: accuracy(trainer, eval_data, config) for label, config in configs.items()}}
        results["runs"][name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
