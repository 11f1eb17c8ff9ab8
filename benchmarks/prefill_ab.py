"""Language-model prefill time of two visorlib trees, side by side (a refactor must not slow it).

Run once per tree, alternating, each in its own process (``PYTHONPATH`` picks the tree)::

    for r in 1 2 3; do for t in OLD NEW; do
      PYTHONPATH=$t flock /tmp/visorlib-bench.lock python benchmarks/prefill_ab.py 2 > ab-$t-$r.json
    done; done

Times the decoder pass of ``visor-llava-ov-0.5b`` (real size, random weights, one thread, the
embedded 384x384 page: 1485 visual + 64 text tokens) for three configurations, on pre-embedded
inputs (the vision tower runs once, untimed). Works with the layout before the family-folder
restructure (``model.run_decoder``), after it (``model.language_model.forward`` on embeddings) and
after issue 20 (the language model an ``nn.Module`` called with the ids and an ``Embedded``).
"""

from __future__ import annotations

import json
import sys
import time

import torch

import visorlib
from visorlib.cli import default_profile_image
from visorlib.models import family_of

CONFIGS = {"8CA-2SA [1, 4]": [1, 4], "8CA-4SA [1, 4, 7, 16]": [1, 4, 7, 16], "all SA (dense cost)": "all"}


def main(repeats: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = visorlib.build("visor-llava-ov-0.5b").eval()
    ids, vision, _ = family_of(model.cfg).processor(model.cfg, None).profile_inputs(default_profile_image(), 64)
    out = {}
    with torch.inference_mode():
        embeds, visual, segments = model.embed(ids, vision["pixel_values"], vision["image_sizes"])
        positions, mask = torch.arange(ids.shape[1])[None], torch.ones_like(ids)
        lm = getattr(model, "language_model", None)
        for label, layers in CONFIGS.items():
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                if isinstance(lm, torch.nn.Module):  # after issue 20
                    from visorlib.visor import Embedded

                    lm(ids, Embedded(embeds, visual, segments), mask, positions, sa_layers=layers, logits_to_keep=1)
                elif lm is not None:  # after the family-folder restructure
                    lm.forward(embeds, positions, mask, visual, segments, lm.routing_mask(ids), lm.request(layers, 1))
                else:  # the layout before the restructure
                    model.run_decoder(embeds, positions, mask, visual, segments, model.routing_mask(ids), layers)
                times.append(time.perf_counter() - started)
            out[label] = times
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
