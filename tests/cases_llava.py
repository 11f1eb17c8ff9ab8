"""The LLaVA-OneVision case of the backbone-agnostic VISOR invariant tests (tests/test_visor.py).

Samples are text, one image's anyres placeholders (all tiles, ``image_newline`` tokens
included) and a question, optionally followed by a routing token; batches are left-padded with
``pixel_values [B, tiles, 3, S, S]`` padded to the largest tile count, plus ``image_sizes``.
"""

from __future__ import annotations

import torch
from cases_base import ROUTING, tiny_cfg
from hf_oracle import left_pad

from visorlib.models.llava_onevision import LlavaOnevisionProcessor
from visorlib.processing import anyres


def sample(model, size=(60, 90), text_before=3, text_after=5, routing=True, seed=0):
    """One row: text, an image, a question, optionally a routing token."""
    g = torch.Generator().manual_seed(seed)
    n = LlavaOnevisionProcessor(model.cfg).num_image_tokens(size)
    parts = [torch.randint(0, 200, (text_before,), generator=g), torch.full((n,), model.cfg.tokens.image_token_id),
             torch.randint(0, 200, (text_after,), generator=g)]
    if routing:
        parts.append(torch.tensor([ROUTING]))
    return torch.cat(parts), size


def _tiles(model, size) -> int:
    side = model.cfg.vision.image_size
    return anyres.num_tiles(size, model.cfg.processing.pinpoints(side), side)


def batch(model, rows, seed=0):
    """Left-pad rows ``[(ids, size), ...]`` into model inputs."""
    ids, mask = left_pad([row for row, _ in rows])
    tiles = max(_tiles(model, size) for _, size in rows)
    g = torch.Generator().manual_seed(seed)
    side = model.cfg.vision.image_size
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(len(rows), tiles, 3, side, side, generator=g),
                image_sizes=torch.tensor([size for _, size in rows]))


def row_inputs(inputs, i, model):
    """Sample ``i`` of a batch, alone and unpadded."""
    keep = inputs["attention_mask"][i].bool()
    tiles = _tiles(model, inputs["image_sizes"][i].tolist())
    return dict(input_ids=inputs["input_ids"][i, keep][None], pixel_values=inputs["pixel_values"][i: i + 1, :tiles],
                image_sizes=inputs["image_sizes"][i: i + 1])


class LlavaCase:
    """How the backbone-agnostic VISOR tests drive one model family (here LLaVA-OneVision).

    A case builds a tiny 6-layer VISOR model (CA at 0 and 3; SA candidates 1, 2, 4; router after
    layer 1), makes per-sample inputs in three shapes (``variant`` 0-2), batches them with left
    padding, and cuts one sample back out. New backbones add a case with the same methods to
    ``CASES`` (tests/visor_helpers.py) and every invariant test in tests/test_visor.py runs for them too.
    """

    name = "llava_onevision"
    sizes = [(60, 90), (45, 200), (30, 30)]
    text = [(3, 5), (1, 2), (6, 4)]

    def tiny_cfg(self, **visor):
        return tiny_cfg(**visor)

    def sample(self, model, variant=0, routing=True, seed=0):
        before, after = self.text[variant]
        return sample(model, self.sizes[variant], before, after, routing=routing, seed=seed)

    def batch(self, model, rows, seed=0):
        return batch(model, rows, seed)

    def row_inputs(self, inputs, i, model):
        return row_inputs(inputs, i, model)

    def other_pixels(self, inputs):
        """The same inputs with different pixels (same shapes and token counts)."""
        return dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))

    def visual_mask(self, model, inputs):
        return inputs["input_ids"] == model.cfg.tokens.image_token_id

    def embed(self, model, inputs):
        """``(embeds, visual_mask, segments, position_ids)`` of a single unpadded sample."""
        ids = inputs["input_ids"]
        embeds, visual, segments = model.embed(ids, inputs["pixel_values"], inputs.get("image_sizes"))
        return embeds, visual, segments, torch.arange(ids.shape[1])[None]
