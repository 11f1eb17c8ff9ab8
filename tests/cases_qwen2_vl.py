"""The Qwen2-VL case of the backbone-agnostic VISOR invariant tests (tests/test_visor.py).

Same methods as ``cases_llava.LlavaCase``: a tiny 6-layer VISOR Qwen2-VL, one-image samples in
three shapes, left-padded batches with flattened patches + ``image_grid_thw``, and one sample cut
back out of a batch. Its positions are M-RoPE's ``[3, B, L]``, so every invariant is also checked
with visual tokens whose rotary positions are not their sequence positions.
"""

from __future__ import annotations

import torch
from cases_base import ROUTING, tiny_cfg
from hf_oracle import left_pad

from visorlib.models.qwen2_vl import Qwen2VLProcessor


class Qwen2VLCase:
    """Drives the VISOR invariant tests for Qwen2-VL (see ``cases_llava.LlavaCase``)."""

    name = "qwen2_vl"
    sizes = [(60, 90), (45, 200), (30, 30)]  # -> patch grids 10x16, 6x32, 4x4 at the tiny card's 12-px unit
    text = [(3, 5), (1, 2), (6, 4)]

    def tiny_cfg(self, **visor):
        return tiny_cfg(card="qwen2-vl-2b", **visor)

    def sample(self, model, variant=0, routing=True, seed=0):
        """One row ``(ids, grid)``: text, an image's visual tokens, a question, maybe a routing token."""
        processor = Qwen2VLProcessor(model.cfg)
        grid = processor._grid(*self.sizes[variant], frames=1)
        before, after = self.text[variant]
        g = torch.Generator().manual_seed(seed)
        parts = [torch.randint(0, 200, (before,), generator=g),
                 torch.full((processor._tokens_of(grid),), model.cfg.tokens.image_token_id),
                 torch.randint(0, 200, (after,), generator=g)]
        if routing:
            parts.append(torch.tensor([ROUTING]))
        return torch.cat(parts), grid

    def batch(self, model, rows, seed=0):
        ids, mask = left_pad([row for row, _ in rows])
        grids = torch.tensor([grid for _, grid in rows])
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(int(grids.prod(-1).sum()), model.vision_tower.patch_dim, generator=g)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)

    def row_inputs(self, inputs, i, model):
        keep = inputs["attention_mask"][i].bool()
        patches = inputs["image_grid_thw"].prod(-1)
        start = int(patches[:i].sum())
        return dict(input_ids=inputs["input_ids"][i, keep][None],
                    pixel_values=inputs["pixel_values"][start: start + int(patches[i])],
                    image_grid_thw=inputs["image_grid_thw"][i: i + 1])

    def other_pixels(self, inputs):
        """The same inputs with different pixels (same grids and token counts)."""
        return dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))

    def visual_mask(self, model, inputs):
        return inputs["input_ids"] == model.cfg.tokens.image_token_id

    def embed(self, model, inputs):
        """``(embeds, visual_mask, segments, position_ids [3, 1, L])`` of a single unpadded sample."""
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        embeds, visual, segments = model.embed(ids, inputs["pixel_values"], grid)
        positions = model.rope_positions(segments, torch.ones_like(ids), [grid], None)
        return embeds, visual, segments, positions
