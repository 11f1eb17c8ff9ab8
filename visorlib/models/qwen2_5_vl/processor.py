"""Text + images/videos -> the tensors a Qwen2.5-VL model takes.

Qwen2.5-VL preprocesses pixels exactly as Qwen2-VL does (transformers' ``Qwen2_5_VLProcessor``
uses ``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor``): smart resize to multiples of 28 px
within ``min_pixels`` / ``max_pixels``, CLIP normalisation, 14-px patches in 2x2 squares, two
frames per temporal patch (:mod:`visorlib.models.qwen2_vl.processor`). The one addition is
``second_per_grid_ts``: for every video, the seconds one temporal patch spans,
``temporal_patch_size / fps``, which the model turns into time-aligned temporal positions.
``fps`` is the rate the caller sampled the frames at (2.0 by default, as in transformers).
"""

from __future__ import annotations

from typing import Any

import torch

from ...validation import InputError
from ..qwen2_vl.processor import Qwen2VLProcessor


class Qwen25VLProcessor(Qwen2VLProcessor):
    """Prepares prompts and images/videos for a Qwen2.5-VL model (:class:`Qwen2VLProcessor` plus ``second_per_grid_ts``).

    Attributes:
        fps: Frames per second the videos were sampled at (set it on the processor, or pass
            ``second_per_grid_ts`` to the model yourself).
    """

    fps: float = 2.0

    def preprocess(
        self, texts: list[str] | None, images: Any, videos: Any, token_reduction: object = None
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """:meth:`Qwen2VLProcessor.preprocess`, plus ``second_per_grid_ts [videos]`` when videos are given."""
        if not self.fps > 0:
            raise InputError(f"fps must be positive, got {self.fps!r}")
        out, image_counts, video_counts = super().preprocess(texts, images, videos, token_reduction)
        if "video_grid_thw" in out:
            step = self.cfg.vision.temporal_patch_size / self.fps
            out["second_per_grid_ts"] = torch.full((len(out["video_grid_thw"]),), step, dtype=torch.float32)
        return out, image_counts, video_counts
