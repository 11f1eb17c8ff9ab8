"""Qwen2-VL: a ViT at native resolution -> 2x2 patch merger -> Qwen2 decoder with M-RoPE.

Reference: Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any
Resolution" (https://arxiv.org/abs/2409.12191). The vision side lives in
:mod:`visorlib.models.qwen2_vl.vision`; the decoder is the shared Qwen2 decoder, fed three rotary
positions per token (M-RoPE) instead of one. Inputs use the Hugging Face layout (``pixel_values``
``[patches, 1176]`` and ``image_grid_thw [images, 3]``; the same for videos), so code moves freely
between the two libraries.

**M-RoPE positions** (:func:`mrope_positions`). Text tokens count up by one on all three axes
(temporal, height, width). A visual token of an image or video whose merged grid is ``t x h x w``
gets ``(start + frame, start + row, start + column)``, ``start`` being the position after the
preceding text; the text that follows resumes at one past the largest position the image used, so
an image of N tokens spans only ``max(t, h, w)`` positions. Left padding is skipped, and
``cache.position_offset`` (largest position + 1 - real tokens, per sample) lets a decode step place its
token from the attention mask alone.

**M-RoPE under VISOR** (the rule this file implements and ``docs/qwen2-vl.md`` documents):

* Every layer that runs a decoder layer on the text stream (text-only layers, skipped SA
  candidates, the text part of CA layers) rotates each text token by **the dense model's M-RoPE
  positions**: those computed above, with the visual tokens still counted in. Taking the image
  out of a layer does not renumber the text.
* Executed SA layers run the dense layer over ``[visual; text]``, every token at its own position.
* Cross-attention blocks use **no rotary positions**: queries are text, keys visual, and the
  visual tokens carry a depth-wise convolution over each image's token sequence (row-major over
  the merged grid) instead. Which images a text token may read is decided by sequence order, not
  by rotary positions (which under M-RoPE are not monotonic in the sequence).

VISOR-TR token packing (``visor.packing_ratio > 1``) is not available for this family: its grids
vary per image, while the packer folds fixed square tiles.
"""

from __future__ import annotations

import functools

import torch

from ...config import ModelConfig
from ...modules.cache import KVCache
from ...modules.layers import positions_from_mask
from ...registry import build_vision_tower
from ...validation import require_tensor
from ...visor.reduction import ReductionSpecError
from ..base import Embedded, InputError, Media, ModelOutput, VisionLanguageModel
from .vision import PatchMerger


def mrope_positions(
    segments: torch.Tensor, attention_mask: torch.Tensor, grids: torch.Tensor, merge: int,
    intervals: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a prefill, like the reference ``get_rope_index``.

    Args:
        segments: ``[B, L]`` ordinal of the image/video each visual token belongs to, -1 on text
            (from :meth:`Qwen2VL.embed`).
        attention_mask: ``[B, L]``, 0 on (left) padding.
        grids: ``[media, 3]`` patch grid ``(t, h, w)`` of each ordinal (images, then videos).
        merge: Spatial merge size (2): a visual token covers ``merge x merge`` patches.
        intervals: Temporal positions per temporal patch of each ordinal (Qwen2.5-VL's videos:
            ``tokens_per_second * second_per_grid_t``; frame ``i`` sits at ``int(i * interval)``,
            computed in float32 as the reference does); None: 1 for every ordinal (Qwen2-VL).

    Returns:
        ``(position_ids [3, B, L], rope_deltas [B, 1])``; padding gets position 0.
    """
    batch, length = segments.shape
    device = segments.device
    positions = torch.zeros(3, batch, length, dtype=torch.long, device=device)
    grid_list = [(t, h // merge, w // merge) for t, h, w in grids.tolist()]
    deltas = []
    for row in range(batch):
        real = attention_mask[row].bool()
        values, counts = torch.unique_consecutive(segments[row][real], return_counts=True)
        chunks, start = [], 0
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if value < 0:
                chunks.append(torch.arange(count, device=device).expand(3, -1) + start)
                start += count
                continue
            t, h, w = grid_list[value]
            if count != t * h * w:
                raise InputError(f"sample {row}: visual input {value} has {count} consecutive tokens, expected "
                                 f"{t * h * w} (its grid is {t}x{h}x{w} after merging); its tokens must form one run")
            frames = torch.arange(t, device=device)
            if intervals is not None and intervals[value] != 1:
                frames = (frames * torch.tensor(intervals[value], dtype=torch.float32, device=device)).long()
            axes = torch.meshgrid(frames, *(torch.arange(n, device=device) for n in (h, w)), indexing="ij")
            chunks.append(torch.stack(axes).flatten(1) + start)
            start = int(chunks[-1].max()) + 1  # the next text starts one past the largest position used
        if chunks:
            positions[:, row, real] = torch.cat(chunks, dim=1)
        deltas.append(start - int(real.sum()))
    return positions, torch.tensor(deltas, device=device)[:, None]


def _patch_owner(grid_thw: object, kind: str, row: int) -> str:
    """``"patch 7 of image 1"``: which image a row of the flattened patches belongs to (for messages)."""
    try:
        ends = torch.as_tensor(grid_thw).prod(-1).cumsum(0)
        return f"patch {row} of {kind} {int(torch.searchsorted(ends, torch.tensor(row), right=True))}"
    except (TypeError, RuntimeError, ValueError):  # no usable grid: the patch alone
        return f"patch {row}"


class Qwen2VL(VisionLanguageModel):
    """Qwen2-VL: vision tower, patch merger (``projector``), Qwen2 decoder with M-RoPE.

    Dense, or VISOR when the card has a ``visor`` section (see the module docstring for how
    positions work then).

    Args:
        cfg: A zoo card, or the config converted from a Hugging Face Qwen2-VL ``config.json``.
    """

    merger_class: type[torch.nn.Module] = PatchMerger  # Qwen2.5-VL's differs only in its norm

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.vision_tower = build_vision_tower(self.cfg.vision)
        self.projector = self.merger_class(self.cfg.vision, self.cfg.decoder.hidden_size)
        self.image_newline = None  # no row-end tokens: M-RoPE positions carry the 2-D layout
        self._finish_init()

    # ------------------------------------------------------------------ vision
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None, kind: str = "image") -> list[torch.Tensor]:
        """Visual tokens of every image (or video), in the decoder's width.

        Args:
            pixel_values: ``[patches, in_channels * temporal_patch_size * patch_size**2]``.
            grid_thw: ``[images, 3]`` patches along time, height and width of each.
            kind: ``"image"`` or ``"video"`` (for messages).

        Returns:
            One ``[t * h * w / merge**2, D]`` tensor per image.
        """
        merge = self.cfg.vision.spatial_merge_size
        width = self.vision_tower.patch_dim
        if grid_thw is not None:
            require_tensor(grid_thw, f"{kind}_grid_thw")
        if pixel_values.dim() != 2 or pixel_values.shape[1] != width:
            raise InputError(f"{kind} pixel values must be [patches, {width}] (flattened patches), "
                             f"got {list(pixel_values.shape)}")
        if grid_thw is None or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            got = None if grid_thw is None else list(grid_thw.shape)
            raise InputError(f"{kind}_grid_thw must be [{kind}s, 3] (t, h, w patches each), got {got}")
        empty = (grid_thw <= 0).any(1)
        if bool(empty.any()):
            index = int(empty.nonzero()[0, 0])
            raise InputError(f"{kind}_grid_thw[{index}] is {grid_thw[index].tolist()}: every {kind} needs at least "
                             "one patch along t, h and w")
        if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
            raise InputError(f"{kind}_grid_thw describes {int(grid_thw.prod(-1).sum())} patches but "
                             f"pixel values hold {pixel_values.shape[0]}")
        if bool((grid_thw[:, 1:] % merge).any()):
            raise InputError(f"{kind}_grid_thw heights and widths must be multiples of {merge}, got {grid_thw.tolist()}")
        patches = self.vision_tower(pixel_values, grid_thw, self.cfg.attn_implementation)
        tokens = self.projector(patches)
        return list(tokens.split((grid_thw.prod(-1) // merge**2).tolist()))

    # ---------------------------------------------------------------- sequence
    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """``(embeddings, visual_mask, segments)`` with visual tokens over each ``<|image_pad|>`` /
        ``<|video_pad|>`` run (see :meth:`~visorlib.models.base.VisionLanguageModel.scatter_media`)."""
        tokens = self.cfg.tokens
        media = [(tokens.image_token_id, "image", "pixel_values", pixel_values, image_grid_thw),
                 (tokens.video_token_id, "video", "pixel_values_videos", pixel_values_videos, video_grid_thw)]
        return self.scatter_media(input_ids, [
            Media(kind, token, f"<|{kind}_pad|>", pixels, functools.partial(self.encode, pixels, grid, kind), argument,
                  rows=functools.partial(_patch_owner, grid, kind))
            for token, kind, argument, pixels, grid in media
        ])

    def embed_inputs(self, input_ids: torch.Tensor, cache: KVCache | None = None, pixel_values=None, image_grid_thw=None,
                     pixel_values_videos=None, video_grid_thw=None) -> Embedded:
        """:meth:`embed` plus this family's position rule (M-RoPE from the grids, see :meth:`rope_positions`)."""
        embeds, visual, segments = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        # Grids in the order embed() numbered the segments: images, then videos, those given.
        grids = [g for pixels, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
                 if pixels is not None]
        return Embedded(embeds, visual, segments, lambda mask: self.rope_positions(segments, mask, grids, cache))

    def rope_positions(
        self,
        segments: torch.Tensor,
        attention_mask: torch.Tensor,
        grids: list[torch.Tensor],
        cache: KVCache | None,
        intervals: list[float] | None = None,
    ) -> torch.Tensor:
        """``[3, B, L]`` M-RoPE positions of the new tokens (prefill, or decode after one).

        Args:
            segments: ``[B, L]`` image/video ordinal per visual token (from :meth:`embed`).
            attention_mask: ``[B, L_cache + L]``, 0 on padding.
            grids: ``image_grid_thw`` then ``video_grid_thw`` (those given), in segment order.
            cache: At prefill it receives the position offset; at decode they place the new tokens.
            intervals: Temporal position step of each ordinal (see :func:`mrope_positions`).
        """
        past = cache.seen if cache is not None else 0
        if past:
            # Decode: one past the prefill's largest position, then counting real tokens.
            text = positions_from_mask(attention_mask)[:, past:]
            if cache.position_offset is not None:
                text = text + cache.position_offset
            return text[None].expand(3, -1, -1)
        grid = torch.cat(grids) if grids else segments.new_zeros(0, 3)
        positions, deltas = mrope_positions(segments, attention_mask, grid, self.cfg.vision.spatial_merge_size,
                                            intervals)
        if cache is not None:
            cache.position_offset = deltas
        return positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0, sa_layers: object = None,
                token_reduction: object = None) -> ModelOutput:
        """Logits for a (possibly left-padded) batch: the contract of :meth:`LlavaOnevision.forward`.

        ``attention_mask``, ``labels``, ``cache``, ``logits_to_keep`` and ``sa_layers`` mean what
        they mean there; the inputs that differ:

        Args:
            input_ids: ``[B, L]`` with ``<|image_pad|>`` / ``<|video_pad|>`` runs already expanded.
            pixel_values: ``[patches, 1176]`` flattened image patches (as the processor makes them).
            image_grid_thw: ``[images, 3]`` patch grid of each image.
            pixel_values_videos: ``[patches, 1176]`` flattened video patches.
            video_grid_thw: ``[videos, 3]`` patch grid of each video.
            position_ids: ``[3, B, L]`` (or ``[B, L]``, the same on all axes); default: M-RoPE
                positions computed from the grids, padding skipped, continued across decode steps.
        """
        pre_llm, in_llm = self.reducers(token_reduction)
        if pre_llm:
            raise ReductionSpecError(
                f"token_reduction: {pre_llm[0].name} is a pre-LLM method, which needs a tiled vision tower whose "
                "attention it can read; Qwen2-VL's tower has no tiles and merges patches 2x2 before the decoder. "
                "In-LLM methods (fastv, pyramiddrop) work with this family")
        embedded = self.embed_inputs(input_ids, cache, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return self.language_model(input_ids, embedded, attention_mask, position_ids, labels, cache, logits_to_keep,
                                   sa_layers, in_llm)
