"""Training-step time per configuration vs dense, at real 0.5B dimensions (random weights).

A step = language-model forward + loss + backward for one sample (one image -> 1485 visual tokens
by default, plus text), everything but the vision tower trainable (the tower's cost is the same for
every configuration, so it runs once, without gradients, outside the timed region).

With ``--pipeline`` it instead times whole :class:`~visorlib.train.Trainer` steps — data loading
(PNG decoding, anyres tiling, collation) included — with the recipe's ``data.num_workers`` at each
of ``--workers`` side by side in one process and one model: the wall time of a step is the time
spent waiting for the loader plus the optimiser step itself.

Usage::

    python benchmarks/train_step_bench.py --json benchmarks/results/train-step-cpu-384.json
    python benchmarks/train_step_bench.py --device cuda --dtype bfloat16 --image-size 1000 --json ...
    OMP_NUM_THREADS=1 flock /tmp/visorlib-bench.lock python benchmarks/train_step_bench.py --pipeline \
        --workers 0 2 --vision-layers 2 --json benchmarks/results/train-pipeline-cpu-384.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import visorlib
from visorlib.profiling import best_time
from visorlib.visor.executor import PlanExecutor
from visorlib.visor.plan import LayerPlan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="visor-llava-ov-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--pipeline", action="store_true", help="time Trainer steps with DataLoader workers")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--pipeline: num_workers values")
    parser.add_argument("--steps", type=int, default=3, help="--pipeline: timed steps per setting (after 1 warm-up)")
    parser.add_argument("--vision-layers", type=int, help="--pipeline: fewer vision-tower layers (CPU time)")
    parser.add_argument("--configuration", default="1,4", help="--pipeline: the SA layers trained (independent mode)")
    args = parser.parse_args()
    if args.pipeline:
        pipeline(args)
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = visorlib.build(args.model, device=device, dtype=dtype).train()
    processor = visorlib.models.family_of(model.cfg).processor(model.cfg)
    from PIL import Image

    image = Image.new("RGB", (args.image_size, args.image_size), (200, 180, 160))
    ids, vision, _ = processor.profile_inputs(image, args.text_tokens)
    ids, vision = ids.to(device), {k: v.to(device) for k, v in vision.items()}
    with torch.no_grad():
        embeds, visual, segments = model.embed(ids, **vision)
    positions = torch.arange(ids.shape[1], device=device)[None]
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(visual, -100)
    plan = model.plan
    rows = {"dense": (LayerPlan(plan.num_layers), list(range(plan.num_layers)))}
    for config in (plan.configurations[0], plan.configurations[-1]):
        rows[plan.describe(config) + " " + str(config)] = (plan, config)

    def step(row_plan, config):
        executes = torch.zeros(1, plan.num_layers, dtype=torch.bool, device=device)
        executes[0, config] = True
        runner = PlanExecutor(model.decoder, row_plan, model.cross_attention, model.cfg.attn_implementation)
        hidden = runner.run(embeds, positions, mask, visual, segments, executes)
        text = ~visual
        logits = model.decoder.logits(hidden[text][None])
        loss = F.cross_entropy(logits[0, :-1].float(), labels[text][1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    result = {"model": args.model, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "visual_tokens": int(visual.sum()), "text_tokens": int((~visual).sum()), "step_seconds": {}}
    step(*rows["dense"])  # warm-up
    for label, (row_plan, config) in rows.items():
        seconds = best_time(lambda row_plan=row_plan, config=config: step(row_plan, config), args.repeats, device)
        result["step_seconds"][label] = seconds
        print(f"{label:40s} {seconds:8.2f} s", flush=True)
    dense = result["step_seconds"]["dense"]
    result["speedup_vs_dense"] = {k: dense / v for k, v in result["step_seconds"].items()}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


def pipeline(args) -> None:
    """Trainer steps (stage 1, one fixed configuration) with each ``--workers`` value, one model."""
    from visorlib.train import Trainer, load_recipe, make_synthetic_dataset

    folder = Path(tempfile.mkdtemp(prefix="visorlib-bench-"))
    cfg = visorlib.get_config(args.model)
    make_synthetic_dataset(folder / "data", cfg, samples=16, image_size=args.image_size)
    overrides = {"vision": {"num_layers": args.vision_layers}} if args.vision_layers else {}
    total = (1 + args.steps) * len(args.workers)
    recipe = {
        "model": {"name": args.model, "overrides": overrides},
        "data": {"datasets": [{"path": str(folder / "data"), "format": "synthetic"}], "tokenizer": str(folder / "data"),
                 "micro_batch_size": 1, "max_length": 8192},
        "training": {"stage": 1, "mode": "independent", "configuration": [int(x) for x in args.configuration.split(",")],
                     "global_batch_size": 2, "max_steps": total, "bf16": False},
        "checkpoint": {"dir": str(folder / "ckpt")},
        "logging": {"progress": False},
    }
    import yaml

    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trainer = Trainer(load_recipe(folder / "recipe.yaml"))
    prepare = []  # the loader's work per micro-batch, measured in this process
    for k in range(2):
        started = time.perf_counter()
        trainer.step_batches[(0, k)]
        prepare.append(time.perf_counter() - started)
    result = {"model": args.model, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
              "vision_layers": args.vision_layers or cfg.vision.num_layers, "image_size": args.image_size,
              "configuration": recipe["training"]["configuration"], "global_batch_size": 2, "micro_batch_size": 1,
              "prepare_seconds_per_micro_batch": min(prepare), "settings": {}}
    per_step = trainer.step_batches.micro_batches_per_step()
    for workers in args.workers:
        trainer.recipe.data.num_workers = workers
        trainer.recipe.data.prefetch_factor = 2 if workers else None
        loader = iter(trainer.data_loader(trainer.step, trainer.step + 1 + args.steps))
        rows = []
        for index in range(1 + args.steps):
            started = time.perf_counter()
            items = [next(loader) for _ in range(per_step)]
            waited = time.perf_counter() - started
            metrics = trainer.train_step(items)
            rows.append({"wait_s": waited, "step_s": metrics["seconds"], "wall_s": time.perf_counter() - started})
            print(f"workers={workers} step {index}: waited {waited:.3f} s for data, step {metrics['seconds']:.2f} s",
                  flush=True)
        timed = rows[1:]  # step 0: warm-up (and worker start-up)
        result["settings"][f"num_workers={workers}"] = {
            "mean_wall_s": sum(r["wall_s"] for r in timed) / len(timed),
            "mean_wait_for_data_s": sum(r["wait_s"] for r in timed) / len(timed),
            "mean_train_step_s": sum(r["step_s"] for r in timed) / len(timed),
            "first_step_wait_s": rows[0]["wait_s"], "steps": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
