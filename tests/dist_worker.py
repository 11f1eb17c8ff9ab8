"""Run by torchrun in tests/test_distributed.py: a few training steps, results per rank as JSON."""

import json
import sys

from visorlib.train import Trainer, load_recipe

recipe_path, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
trainer = Trainer(load_recipe(recipe_path))
logs = [trainer.train_step() for _ in range(steps)]
with open(f"{out_dir}/rank{trainer.dist.rank}.json", "w") as handle:
    json.dump({"world": trainer.dist.world, "loss": [m["loss"] for m in logs],
               "configuration": [m["configuration"] for m in logs], "grad_norm": [m["grad_norm"] for m in logs]}, handle)
trainer.close()
