"""The Qwen2.5-VL case of the backbone-agnostic VISOR invariant tests (tests/test_visor.py).

Qwen2-VL's case (same inputs: flattened patches + ``image_grid_thw``, M-RoPE positions) on a tiny
VISOR Qwen2.5-VL, whose tower attends in 2x2-token windows in block 0 and over the whole image in
block 1: the three image shapes (10x16, 6x32 and 4x4 patches) give 12, 8 and 1 windows, the first
two with partial windows at their edges.
"""

from __future__ import annotations

from cases_base import tiny_cfg
from cases_qwen2_vl import Qwen2VLCase


class Qwen25VLCase(Qwen2VLCase):
    """Drives the VISOR invariant tests for Qwen2.5-VL (see ``cases_llava.LlavaCase``)."""

    name = "qwen2_5_vl"

    def tiny_cfg(self, **visor):
        return tiny_cfg(card="qwen2.5-vl-3b", **visor)
