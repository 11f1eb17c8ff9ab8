"""Text + images/videos -> the tensors a Qwen2-VL model takes.

Mirrors transformers 5.23's ``Qwen2VLProcessor`` with the image processor ``AutoImageProcessor``
picks by default, the *torchvision* backend (``Qwen2VLImageProcessor``, not ``...Pil``), and
``Qwen2VLVideoProcessor``: same keys, same ``input_ids``, bit-identical ``pixel_values``, because
the same ``torchvision.transforms.v2`` kernels run on the same uint8 tensors in the same order.

Per image (or video, every frame at the first frame's size):

1. **Smart resize** (:func:`smart_resize`): each side to the nearest multiple of
   ``patch_size * spatial_merge_size`` (28), then, keeping the aspect ratio, scaled down when the
   area exceeds ``max_pixels`` or up when it is below ``min_pixels``; bicubic with antialiasing.
2. Rescale and normalise (CLIP mean/std in the real cards) in float32.
3. **Patchify** (:func:`patchify`): frames in groups of ``temporal_patch_size`` (2; an image is
   two copies of itself, a video with an odd frame count repeats its last frame), cut into 14x14
   patches taken in 2x2 squares (the squares row-major, row-major inside), each flattened as
   (channel, frame, row, column) to 1176 values. ``pixel_values`` stacks all images' patches;
   ``image_grid_thw`` gives each image's ``(t, h, w)`` patch grid.

Each ``<|image_pad|>`` in the text (the chat template writes one per image, inside
``<|vision_start|>...<|vision_end|>``) is expanded to ``t * h * w / 4`` copies, one per visual token;
``<|video_pad|>`` likewise. The tokenizer, routing token, padding and ``chat`` are shared with
LLaVA-OneVision (:class:`~visorlib.processing.processor.ChatProcessor`).

Differences from transformers: no ``mm_token_type_ids`` is returned (visorlib's model finds the
visual runs itself and would reject the extra key), and images may be nested per sample or flat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ...config import ModelConfig
from ...processing.chat import QWEN2_VL_SYSTEM
from ...processing.image import _frames_tensor, _normalize, to_chw_tensor, tvF
from ...processing.processor import ChatProcessor
from ...processing.video import qwen2_vl_indices
from ...validation import InputError

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL resizes a ``height x width`` image to: multiples of ``factor``, area bounded.

    Raises:
        InputError: The aspect ratio exceeds 200 (the reference refuses those too).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"image of {height}x{width} has an aspect ratio above {MAX_ASPECT_RATIO}")
    # Python's round (half to even) on purpose: the reference uses it, and 7.5 -> 8 but 6.5 -> 6.
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def patchify(frames: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, list[int]]:
    """``[F, C, H, W]`` normalised frames -> ``([t * h * w, C * T * p * p] patches, [t, h, w])``."""
    vision = cfg.vision
    step, patch, merge = vision.temporal_patch_size, vision.patch_size, vision.spatial_merge_size
    if len(frames) % step:
        frames = torch.cat([frames, frames[-1:].expand(step - len(frames) % step, -1, -1, -1)])
    channels, height, width = frames.shape[1:]
    t, h, w = len(frames) // step, height // patch, width // patch
    x = frames.reshape(t, step, channels, h // merge, merge, patch, w // merge, merge, patch)
    # -> [t, square row, square column, row in square, column in square, channel, frame, y, x]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, channels * step * patch * patch), [t, h, w]


def _resize_normalize(frames: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Smart-resize uint8 ``[F, C, H, W]`` frames and normalise them (float32)."""
    processing, factor = cfg.processing, cfg.vision.patch_size * cfg.vision.spatial_merge_size
    size = smart_resize(*frames.shape[-2:], factor, processing.min_pixels, processing.max_pixels)
    frames = tvF.resize(frames, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return _normalize(frames, processing.image_mean, processing.image_std)


def _stack(clips: list[tuple[torch.Tensor, list[int]]], kind: str) -> dict[str, torch.Tensor]:
    values = "pixel_values" if kind == "image" else "pixel_values_videos"
    return {values: torch.cat([c for c, _ in clips]),
            f"{kind}_grid_thw": torch.tensor([g for _, g in clips], dtype=torch.long)}


def preprocess_qwen2_vl_images(images: Sequence[Any], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``pixel_values [patches, 1176]`` and ``image_grid_thw [images, 3]`` of a list of images.

    Args:
        images: PIL images, ``numpy.ndarray`` or ``torch.Tensor`` (see :func:`.image.to_chw_tensor`).
        cfg: Model configuration (patch, merge and temporal sizes; min/max pixels; mean/std).
    """
    step = cfg.vision.temporal_patch_size
    clips = []
    for index, image in enumerate(images):
        frame = _resize_normalize(to_chw_tensor(image, index)[None], cfg)
        clips.append(patchify(frame.expand(step, -1, -1, -1), cfg))
    return _stack(clips, "image")


def preprocess_qwen2_vl_videos(videos: Sequence[Any], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``pixel_values_videos [patches, 1176]`` and ``video_grid_thw [videos, 3]``.

    Args:
        videos: Each a list of frames or a ``[F, H, W, C]`` / ``[F, C, H, W]`` array or tensor.
            Frames are used as given (sampling them is the caller's job, as with transformers'
            default ``do_sample_frames=False``).
        cfg: Model configuration.
    """
    return _stack([patchify(_resize_normalize(_frames_tensor(video), cfg), cfg) for video in videos], "video")


def _flat_images(images: Any) -> list[Any]:
    """One image, a flat list, or one list per sample -> a flat list in placeholder order."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]


class Qwen2VLProcessor(ChatProcessor):
    """Prepares prompts and images/videos for a Qwen2-VL model.

    Args:
        cfg: The model's configuration (patch sizes, min/max pixels, mean/std, token ids).
        tokenizer: The model's tokenizer; may be None to preprocess pixels only.

    Raises:
        ValueError: The tokenizer's ``<|image_pad|>`` / ``<|video_pad|>`` ids differ from ``cfg.tokens``.
    """

    image_token = IMAGE_PAD
    video_token = VIDEO_PAD
    data_image = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>"
    data_video = "<|vision_start|>" + VIDEO_PAD + "<|vision_end|>"
    turn_open = "<|im_start|>{role}\n"
    turn_close = "<|im_end|>\n"
    default_system = QWEN2_VL_SYSTEM
    sample_video_indices = staticmethod(qwen2_vl_indices)

    def _tokens_of(self, grid: Sequence[int]) -> int:
        return math.prod(grid) // self.cfg.vision.spatial_merge_size**2

    def _grid(self, height: int, width: int, frames: int) -> list[int]:
        vision = self.cfg.vision
        factor = vision.patch_size * vision.spatial_merge_size
        size = smart_resize(height, width, factor, self.cfg.processing.min_pixels, self.cfg.processing.max_pixels)
        return [-(-frames // vision.temporal_patch_size), *(s // vision.patch_size for s in size)]

    def num_image_tokens(self, image_size: Sequence[int]) -> int:
        """Visual tokens (``<|image_pad|>`` copies) for an image of ``(height, width)``."""
        return self._tokens_of(self._grid(*image_size, frames=1))

    def num_video_tokens(self, num_frames: int, frame_size: Sequence[int]) -> int:
        """Visual tokens for a video of ``num_frames`` frames of ``(height, width)``."""
        return self._tokens_of(self._grid(*frame_size, frames=num_frames))

    def preprocess(
        self, texts: list[str] | None, images: Any, videos: Any, token_reduction: object = None
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """The pixel tensors of :meth:`__call__`, and the visual-token count of every image / video.

        Args:
            texts: The prompts (None for pixels only), one ``<|image_pad|>`` / ``<|video_pad|>``
                per image / video (:meth:`apply_chat_template` writes them).
            images: One image, a flat list in placeholder order, or one list per sample.
            videos: One video (list of frames, or ``[F, H, W, C]`` / ``[F, C, H, W]``) or a list of
                videos, in placeholder order.
            token_reduction: Accepted for the shared ``__call__``; no count changes (Qwen2-VL refuses
                pre-LLM methods, and in-LLM methods drop tokens inside the decoder).

        Returns:
            ``pixel_values`` ``[patches, 1176]`` and ``image_grid_thw [images, 3]`` (when images
            are given), ``pixel_values_videos`` and ``video_grid_thw`` (when videos are given);
            then the token counts.
        """
        image_list, video_list = _flat_images(images), self.videos_of(videos)
        if texts is not None:
            for token, given in ((IMAGE_PAD, image_list), (VIDEO_PAD, video_list)):
                placed = sum(t.count(token) for t in texts)
                if placed != len(given):
                    raise InputError(f"the text holds {placed} {token} placeholders but {len(given)} were passed")
        out: dict[str, Any] = {}
        if image_list:
            out.update(preprocess_qwen2_vl_images(image_list, self.cfg))
        if video_list:
            out.update(preprocess_qwen2_vl_videos(video_list, self.cfg))
        counts = [[self._tokens_of(g) for g in out.get(f"{kind}_grid_thw", torch.empty(0, 3)).tolist()]
                  for kind in ("image", "video")]
        return out, *counts

    def profile_inputs(self, image: Any, n_text: int, seed: int = 0,
                       token_reduction: object = None) -> tuple[torch.Tensor, dict[str, Any], int]:
        """A one-image prompt with ``n_text`` random ordinary text ids around the visual tokens.

        For measuring cost without a tokenizer (``visorlib profile``). Returns ``(input_ids [1, L],
        vision inputs, patches through the vision tower)``; for Qwen2-VL the FLOP model counts the
        tower by patches (one image: one attention sequence), see :func:`visorlib.flops.vision_tower_flops`.
        ``token_reduction`` is accepted as the other families' is: an in-LLM method drops tokens
        inside the decoder, so the prompt is unchanged.

        Raises:
            ReductionSpecError: A malformed spec, or a pre-LLM method (Qwen2-VL has no tiled tower).
        """
        from ...visor.reduction import PRE_LLM, ReductionSpecError, parse_reduction

        pre_llm = [r.name for r in parse_reduction(token_reduction) if r.where == PRE_LLM]
        if pre_llm:
            raise ReductionSpecError(f"token_reduction: {pre_llm[0]} is a pre-LLM method, which Qwen2-VL does not "
                                     "run (fastv and pyramiddrop work on every family)")
        vision = self(images=[image])
        grid = vision["image_grid_thw"][0].tolist()
        return self.profile_ids(self._tokens_of(grid), n_text, seed), vision, vision["pixel_values"].shape[0]
