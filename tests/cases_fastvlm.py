"""The FastVLM case of the backbone-agnostic VISOR invariant tests (tests/test_visor.py).

A ``cases_llava.LlavaCase`` (FastVLM *is* LLaVA-OneVision's assembly) with a tiny 6-layer VISOR
FastVLM: a FastViT tower at widths 8..128, one padded 128-px tile per image -> 2 x 2 visual
tokens, no ``image_newline``. Batches use transformers' FastVLM layout (``pixel_values [images,
3, S, S]``, no ``image_sizes``). Every VISOR invariant is thereby also checked on a convolutional
tower, with BatchNorm and layer-scale weights the other backbones do not have.
"""

from __future__ import annotations

import torch
from cases_base import tiny_cfg
from cases_llava import LlavaCase
from hf_oracle import left_pad


class FastVLMCase(LlavaCase):
    """Drives the VISOR invariant tests for FastVLM; samples (text and placeholders) as LLaVA's."""

    name = "fast_vlm"  # LlavaCase's image sizes: any aspect ratio is padded to one square tile

    def tiny_cfg(self, **visor):
        return tiny_cfg(card="fastvlm-0.5b", **visor)

    def batch(self, model, rows, seed=0):
        ids, mask = left_pad([row for row, _ in rows])
        side = model.cfg.vision.image_size
        g = torch.Generator().manual_seed(seed)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(len(rows), 3, side, side, generator=g))

    def row_inputs(self, inputs, i, model):
        keep = inputs["attention_mask"][i].bool()
        return dict(input_ids=inputs["input_ids"][i, keep][None], pixel_values=inputs["pixel_values"][i: i + 1])
