"""Training-step time per configuration vs dense, at real 0.5B dimensions (random weights).

A step = language-model forward + loss + backward for one sample (one image -> 1485 visual tokens
by default, plus text), everything but the vision tower trainable (the tower's cost is the same for
every configuration, so it runs once, without gradients, outside the timed region).

Usage::

    python benchmarks/train_step_bench.py --json benchmarks/results/train-step-cpu-384.json
    python benchmarks/train_step_bench.py --device cuda --dtype bfloat16 --image-size 1000 --json ...
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import visorlib
from visorlib.blocks.plan import LayerPlan
from visorlib.models.executor import PlanExecutor
from visorlib.profiling import best_time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="visor-llava-ov-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
