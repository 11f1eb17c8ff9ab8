"""Qwen2.5-VL: a windowed ViT -> 2x2 merger with RMSNorm -> Qwen2 decoder with M-RoPE.

Reference: Bai et al., "Qwen2.5-VL Technical Report" (https://arxiv.org/abs/2502.13923). The
assembly is Qwen2-VL's (:class:`~visorlib.models.qwen2_vl.model.Qwen2VL`, which this class
subclasses): the same inputs (flattened patches and ``*_grid_thw``), the same placeholder runs,
the same decoder and M-RoPE rule under VISOR (see :mod:`visorlib.models.qwen2_vl.model`). Two
things differ:

* the tower and merger (:mod:`.vision`: window attention, RMSNorm, gated MLP);
* **time-aligned video positions.** A video's temporal patch ``i`` gets the temporal position
  ``start + int(i * tokens_per_second * second_per_grid_t)``, so positions track seconds, not
  frames (``second_per_grid_ts``: seconds one temporal patch spans, one value per video; the
  processor returns it as ``temporal_patch_size / fps``; 1 when not given, as in transformers).
  Images keep a step of 1. The text after a video resumes one past the largest position the
  video used on any axis, Qwen2-VL's rule in visorlib (transformers 5.23 resumes at
  ``start + max(h, w)``; the two agree unless the scaled temporal positions outrun the merged
  rows and columns, see ``docs/qwen2-vl.md``).
"""

from __future__ import annotations

import torch

from ...modules.cache import KVCache
from ...visor.reduction import ReductionSpecError
from ..base import Embedded, InputError, ModelOutput
from ..qwen2_vl.model import Qwen2VL
from .vision import RMSPatchMerger


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL: windowed vision tower, RMSNorm merger (``projector``), Qwen2 decoder with M-RoPE.

    Args:
        cfg: A zoo card, or the config converted from a Hugging Face Qwen2.5-VL ``config.json``.
    """

    merger_class = RMSPatchMerger

    def intervals(self, image_grid_thw, video_grid_thw, second_per_grid_ts) -> list[float]:
        """Temporal position step of every media ordinal: 1 per image, then one per video."""
        images = [1.0] * (0 if image_grid_thw is None else len(image_grid_thw))
        if video_grid_thw is None:
            return images
        videos = len(video_grid_thw)
        if second_per_grid_ts is None:
            seconds = [1.0] * videos
        else:
            seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).flatten().tolist()
            if len(seconds) != videos:
                raise InputError(f"second_per_grid_ts holds {len(seconds)} values but video_grid_thw describes "
                                 f"{videos} videos (one value per video: seconds per temporal patch)")
        rate = torch.tensor(self.cfg.vision.tokens_per_second, dtype=torch.float32)
        return images + [float(rate * torch.tensor(s, dtype=torch.float32)) for s in seconds]

    def embed_inputs(self, input_ids: torch.Tensor, cache: KVCache | None = None, pixel_values=None, image_grid_thw=None,
                     pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> Embedded:
        """Qwen2-VL's :meth:`~Qwen2VL.embed_inputs` with time-aligned video positions."""
        embeds, visual, segments = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        # Grids (and steps) in the order embed() numbered the segments: images, then videos, those given.
        images = image_grid_thw if pixel_values is not None else None
        videos = video_grid_thw if pixel_values_videos is not None else None
        grids = [g for g in (images, videos) if g is not None]
        steps = self.intervals(images, videos, second_per_grid_ts)
        return Embedded(embeds, visual, segments, lambda mask: self.rope_positions(segments, mask, grids, cache, steps))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0, sa_layers: object = None,
                token_reduction: object = None) -> ModelOutput:
        """Logits for a (possibly left-padded) batch: :meth:`Qwen2VL.forward`'s contract, plus

        Args:
            second_per_grid_ts: ``[videos]`` seconds one temporal patch of each video spans (the
                processor's ``temporal_patch_size / fps``); None: 1 second each.
        """
        pre_llm, in_llm = self.reducers(token_reduction)
        if pre_llm:
            raise ReductionSpecError(
                f"token_reduction: {pre_llm[0].name} is a pre-LLM method, which needs a tiled vision tower whose "
                "attention it can read; Qwen2.5-VL's tower has no tiles and merges patches 2x2 before the decoder. "
                "In-LLM methods (fastv, pyramiddrop) work with this family")
        embedded = self.embed_inputs(input_ids, cache, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                     second_per_grid_ts)
        return self.language_model(input_ids, embedded, attention_mask, position_ids, labels, cache, logits_to_keep,
                                   sa_layers, in_llm)
