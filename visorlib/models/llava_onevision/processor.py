"""The LLaVA-OneVision processor: anyres tiles for a sample's only image, base tiles otherwise.

Prompts, tokenisation, chat templates and padding are the shared :class:`~visorlib.processing.ChatProcessor`;
this family adds how many placeholder tokens an image or video expands to and how its pixels are
prepared (all the tiling arithmetic lives in :mod:`visorlib.processing.anyres`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...config import ModelConfig
from ...processing import anyres
from ...processing.chat import IMAGE_TOKEN, VIDEO_TOKEN
from ...processing.image import preprocess_images, preprocess_video
from ...processing.processor import ChatProcessor, group_images
from ...validation import InputError
from ...visor.reduction import (
    PRE_LLM,
    Reducer,
    ReductionSpecError,
    drops_nothing,
    parse_reduction,
    pre_llm_tokens,
)


def reduced_image_tokens(cfg: ModelConfig, reducer: Reducer, tiles: int | Sequence[int]) -> int:
    """Visual tokens of images under a pre-LLM method: each image's tiles' kept tokens, then one
    ``image_newline`` (the reduced layout of :meth:`LlavaOnevision.encode_images`; no unpadding).

    Args:
        cfg: The model's card.
        reducer: A pre-LLM reducer.
        tiles: Tiles of one image, or one count per image (what :func:`visorlib.flops` is given).
    """
    images = [tiles] if isinstance(tiles, int) else [int(t) for t in tiles]
    if not images or min(images) < 1:
        raise ReductionSpecError(f"{reducer.name} reduces each image's tiles: pass tiles= (tiles of the image, or "
                                 f"one count per image), got {tiles!r}")
    per_tile = cfg.feature_grid_size**2
    return sum(pre_llm_tokens(reducer, per_tile, n) + int(cfg.use_image_newline) for n in images)


class LlavaOnevisionProcessor(ChatProcessor):
    """Prepares prompts and images/videos for a LLaVA-OneVision model.

    Args:
        cfg: The model's configuration (tile size, pinpoints, token ids, mean/std).
        tokenizer: The model's tokenizer; may be None to preprocess pixels only.

    Raises:
        ValueError: The tokenizer's ``<image>`` / ``<video>`` ids differ from ``cfg.tokens``.
    """

    image_token = IMAGE_TOKEN
    video_token = VIDEO_TOKEN

    # -- token counts (all arithmetic lives in anyres) -------------------------------------------

    def pre_llm_reducer(self, token_reduction: object = None) -> Reducer | None:
        """The pre-LLM method of ``token_reduction`` (None: the card's ``token_reduction``; ``[]``: none).

        None as well for one that keeps every token (:func:`~visorlib.visor.reduction.drops_nothing`):
        the model then lays the image out unreduced, and the counts must follow.
        """
        spec = self.cfg.token_reduction if token_reduction is None else token_reduction
        reducer = next((r for r in parse_reduction(spec) if r.where == PRE_LLM), None)
        return None if reducer is None or drops_nothing(reducer, self.cfg.feature_grid_size**2) else reducer

    def num_image_tokens(self, image_size: Sequence[int], tiled: bool = True, token_reduction: object = None) -> int:
        """Placeholder tokens for an image of ``(height, width)``.

        ``tiled=False`` for images of multi-image samples; with ``processing.aspect_mode: pad``
        (FastVLM) no image is tiled. Under a pre-LLM ``token_reduction`` (None: the card's) an
        image is its tiles' kept tokens plus one ``image_newline`` (the model's reduced layout).
        """
        side = self.cfg.vision.image_size
        tiled = tiled and self.cfg.processing.aspect_mode == "anyres"
        reducer = self.pre_llm_reducer(token_reduction)
        if reducer is not None:
            tiles = anyres.num_tiles(image_size, self.cfg.processing.pinpoints(side), side) if tiled else 1
            return reduced_image_tokens(self.cfg, reducer, tiles)
        return anyres.num_image_tokens(
            image_size,
            self.cfg.processing.pinpoints(side),
            side,
            self.cfg.feature_grid_size,
            self.cfg.processing.max_tiles,
            newline=self.cfg.use_image_newline,
            tiled=tiled,
        )

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholder tokens for a video of ``num_frames`` frames."""
        return anyres.num_video_tokens(num_frames, self.cfg.feature_grid_size, newline=self.cfg.use_image_newline)

    # -- main entry point -------------------------------------------------------------------------

    def preprocess(
        self, texts: list[str] | None, images: Any, videos: Any, token_reduction: object = None
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """The pixel tensors of :meth:`__call__`, and the placeholder count of every image / video.

        Args:
            texts: The prompts (None for pixels only); ``<image>`` / ``<video>`` mark where each goes.
            images: One image, a flat list (assigned to samples in placeholder order), or one list
                per sample. PIL images, ``numpy.ndarray`` or ``torch.Tensor``.
            videos: One video (list of frames, or ``[F, H, W, C]`` / ``[F, C, H, W]``) or a list of
                videos, in placeholder order. All videos must have the same number of frames.
            token_reduction: The spec the model will be called with (None: the card's); a pre-LLM
                method changes each image's count (:meth:`num_image_tokens`) and refuses videos.

        Returns:
            ``pixel_values`` ``[images, tiles, 3, S, S]``, ``image_sizes`` ``[images, 2]`` and
            ``batch_num_images`` (images per sample that has any; when images are given),
            ``pixel_values_videos`` ``[videos, F, 3, S, S]`` (when videos are given); then the
            token counts.
        """
        out: dict[str, Any] = {}
        if texts is None:
            # Pixels only: a flat list makes every image its own single-image sample, as in HF.
            flat = images if isinstance(images, (list, tuple)) else [] if images is None else [images]
            nested = bool(flat) and all(isinstance(item, (list, tuple)) for item in flat)
            groups = [list(g) for g in flat] if nested else [[image] for image in flat]
        else:
            groups = group_images(images, [t.count(IMAGE_TOKEN) for t in texts])
        flat_images = [image for group in groups for image in group]
        # Anyres tiling is for the only image of a sample; "pad" mode (FastVLM) never tiles.
        anyres_mode = self.cfg.processing.aspect_mode == "anyres"
        tiled = [anyres_mode and len(group) == 1 for group in groups for _ in group]
        if flat_images:
            out.update(preprocess_images(flat_images, self.cfg, tiled=tiled))
            out["batch_num_images"] = torch.tensor([len(g) for g in groups if g], dtype=torch.long)

        video_list = self.videos_of(videos)
        if texts is not None:
            placed = sum(t.count(VIDEO_TOKEN) for t in texts)
            if placed != len(video_list):
                raise InputError(f"the text holds {placed} {VIDEO_TOKEN} placeholders but {len(video_list)} videos were passed")
        reducer = self.pre_llm_reducer(token_reduction) if video_list else None
        if reducer is not None:
            raise ReductionSpecError(f"token_reduction: {reducer.name} is a pre-LLM method, and pre-LLM reduction of "
                                     "videos is not supported; use an in-LLM method (fastv, pyramiddrop) for videos")
        if video_list:
            clips = [preprocess_video(video, self.cfg) for video in video_list]
            frame_counts = [clip.shape[1] for clip in clips]
            if len(set(frame_counts)) > 1:
                raise InputError(f"videos in one batch must have the same number of frames, got {frame_counts}")
            out["pixel_values_videos"] = torch.cat(clips)

        image_counts = [self.num_image_tokens(size, t, token_reduction)
                        for size, t in zip(out.get("image_sizes", []), tiled, strict=True)]
        video_counts = [self.num_video_tokens(n) for n in (frame_counts if video_list else [])]
        return out, image_counts, video_counts

    # -- conveniences -----------------------------------------------------------------------------

    def profile_inputs(
        self, image: Any, n_text: int, seed: int = 0, token_reduction: object = None
    ) -> tuple[torch.Tensor, dict[str, Any], int]:
        """A one-image prompt with ``n_text`` random ordinary text ids around the placeholders.

        For measuring cost without a tokenizer (``visorlib profile``). Returns ``(input_ids [1, L],
        vision inputs, tiles through the vision tower)``; ``token_reduction`` as in :meth:`num_image_tokens`.
        """
        vision = self(images=[image])
        vision.pop("batch_num_images", None)
        size = vision["image_sizes"][0].tolist()
        tiles = vision["pixel_values"].shape[1]  # one image: exactly its tiles, no padding
        return self.profile_ids(self.num_image_tokens(size, token_reduction=token_reduction), n_text, seed), vision, tiles
