"""The InternVL case of the backbone-agnostic VISOR invariant tests (tests/test_visor.py).

A tiny 6-layer VISOR InternVL3: an InternViT with class token and layer scales over 48-px tiles,
pixel-shuffled to 4x4 = 16 tokens a tile. Samples are text, one image's dynamic tiles (thumbnail
included: the three sizes give 3, 5 and 1 tiles) and a question; batches use transformers' layout,
every row's tiles one after the other in ``pixel_values [tiles, 3, S, S]``, and the model finds
each image as its run of ``<IMG_CONTEXT>`` tokens.
"""

from __future__ import annotations

import torch
from cases_base import ROUTING, tiny_cfg
from cases_llava import LlavaCase
from hf_oracle import left_pad

from visorlib.models.internvl import InternVLProcessor
from visorlib.models.internvl.processor import num_tiles


class InternVLCase(LlavaCase):
    """Drives the VISOR invariant tests for InternVL (see ``cases_llava.LlavaCase``)."""

    name = "internvl"

    def tiny_cfg(self, **visor):
        return tiny_cfg(card="internvl3-1b", **visor)

    def sample(self, model, variant=0, routing=True, seed=0):
        """One row ``(ids, tiles)``: text, an image's tokens, a question, maybe a routing token."""
        size, (before, after) = self.sizes[variant], self.text[variant]
        g = torch.Generator().manual_seed(seed)
        n = InternVLProcessor(model.cfg).num_image_tokens(size)
        parts = [torch.randint(0, 200, (before,), generator=g), torch.full((n,), model.cfg.tokens.image_token_id),
                 torch.randint(0, 200, (after,), generator=g)]
        if routing:
            parts.append(torch.tensor([ROUTING]))
        return torch.cat(parts), num_tiles(*size, model.cfg.vision.image_size, model.cfg.processing.max_tiles)

    def batch(self, model, rows, seed=0):
        ids, mask = left_pad([row for row, _ in rows])
        side = model.cfg.vision.image_size
        g = torch.Generator().manual_seed(seed)
        tiles = sum(n for _, n in rows)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(tiles, 3, side, side, generator=g))

    def row_inputs(self, inputs, i, model):
        keep = inputs["attention_mask"][i].bool()
        # Each row's tiles: its image tokens over the tokens a tile gives, the rows' tiles in order.
        tokens = (inputs["input_ids"] == model.cfg.tokens.image_token_id).sum(1)
        tiles = (tokens // model.cfg.vision.tokens_per_tile).tolist()
        return dict(input_ids=inputs["input_ids"][i, keep][None],
                    pixel_values=inputs["pixel_values"][sum(tiles[:i]): sum(tiles[: i + 1])])

    def embed(self, model, inputs):
        ids = inputs["input_ids"]
        embeds, visual, segments = model.embed(ids, inputs["pixel_values"])
        return embeds, visual, segments, torch.arange(ids.shape[1])[None]
