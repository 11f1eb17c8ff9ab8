"""FLOP-counting rules shared by the analytic model and the families' tower formulas.

A multiply-add is 2 FLOPs; ``torch.utils.flop_counter.FlopCounterMode`` applies the same rules,
which is what the tests compare :func:`visorlib.flops` against.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch

from ..config import VisionConfig
from ..registry import build_vision_tower


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    """A dense layer applied to ``tokens`` rows."""
    return 2.0 * tokens * fan_in * fan_out


def attention_core_flops(q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """Scores (``QK^T``) plus weighted sum (``AV``), full rectangle."""
    return 4.0 * q_len * k_len * heads * head_dim


def counted_tower_flops(cfg: VisionConfig) -> float:
    """FLOPs of one tile through the vision tower, counted by running it on the meta device.

    A formula for FastViT would have to follow dozens of convolution shapes (re-parameterised
    stems, depth-wise mixers, strided downsampling, squeeze-excite) and drift whenever timm
    changes; instead the tower is built on the meta device (no memory, no arithmetic) and one
    ``[1, 3, S, S]`` tile is pushed through it under ``FlopCounterMode``, which applies the same
    counting rules as the rest of this module. The result is cached per tower configuration.
    """
    return _counted_tower_flops(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


@lru_cache(maxsize=32)
def _counted_tower_flops(cfg_json: str) -> float:
    cfg = VisionConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        tower = build_vision_tower(cfg)
        pixels = torch.empty(1, 3, cfg.image_size, cfg.image_size)
    from torch.utils.flop_counter import FlopCounterMode  # here: it imports triton where installed (slow)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(pixels)
    return float(counter.get_total_flops())
