"""Text + images -> the tensors an InternVL3 model takes: dynamic tiles and a thumbnail.

Mirrors transformers' ``InternVLProcessor`` with its image processor (``GotOcr2ImageProcessor``,
torchvision backend, ``crop_to_patches=True``): the same ``pixel_values`` and ``input_ids``.

Per image:

1. **Grid** (:func:`tile_grid`): among the ``cols x rows`` grids of 1 to ``max_tiles`` (12) tiles,
   the one whose aspect ratio is closest to the image's; on a tie the one with more tiles, while
   the image is larger than half the tiles' area.
2. **Tiles**: the image resized (bicubic, antialiased, on uint8) to ``cols * 448 x rows * 448`` and
   cut into 448-px tiles, row-major; when there is more than one, the whole image resized to one
   tile follows as a **thumbnail**.
3. Rescale and normalise (ImageNet mean/std in the real cards) in float32.

Each ``<IMG_CONTEXT>`` in the text (one per image) becomes ``<img>``, then 256 ``<IMG_CONTEXT>`` per
tile (the tokens the pixel shuffle leaves; fewer under ``pooling``), then ``</img>``. Videos are
not taken: pass a video's frames as images (transformers writes each frame as a one-tile image).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...config import ModelConfig
from ...processing.image import _normalize, to_chw_tensor, tvF
from ...processing.processor import ChatProcessor
from ...processing.templates import normalize_messages
from ...processing.tokenizer import Tokenizer
from ...validation import InputError
from ...visor.reduction import PRE_LLM, Reducer, ReductionSpecError, parse_reduction
from ..llava_onevision.processor import reduced_image_tokens  # tiles' kept tokens; no newline here
from ..qwen2_vl.processor import _flat_images
from .model import IMAGE_CONTEXT

IMAGE_START, IMAGE_END = "<img>", "</img>"


@functools.lru_cache(maxsize=256)
def tile_grid(height: int, width: int, tile: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """``(cols, rows)`` of the tiles an image of ``height x width`` is cut into (transformers' rule)."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(height: int, width: int, tile: int, max_tiles: int) -> int:
    """Tiles through the tower for one image: the grid, plus a thumbnail when the grid has several."""
    cols, rows = tile_grid(height, width, tile, max_tiles)
    return cols * rows + (cols * rows > 1)


def image_tiles(image: Any, index: int, cfg: ModelConfig) -> torch.Tensor:
    """``[tiles, 3, S, S]`` float32 normalised tiles (then the thumbnail) of one image."""
    frame = to_chw_tensor(image, index)
    side, height, width = cfg.vision.image_size, *frame.shape[-2:]
    cols, rows = tile_grid(height, width, side, cfg.processing.max_tiles)
    bicubic = dict(interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    canvas = tvF.resize(frame, [rows * side, cols * side], **bicubic)
    tiles = [canvas[..., r * side:(r + 1) * side, c * side:(c + 1) * side] for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(tvF.resize(frame, [side, side], **bicubic))
    return _normalize(torch.stack(tiles), cfg.processing.image_mean, cfg.processing.image_std)


class InternVLProcessor(ChatProcessor):
    """Prepares prompts and images for an InternVL3 model.

    Args:
        cfg: The model's configuration (tile size, max tiles, mean/std, token ids).
        tokenizer: The model's tokenizer; may be None to preprocess pixels only.

    Raises:
        ValueError: The tokenizer's ``<IMG_CONTEXT>`` id differs from ``cfg.tokens.image_token_id``.
    """

    image_token = IMAGE_CONTEXT
    video_token = "<video>"  # not a token of InternVL's tokenizer: videos are refused (pass frames as images)
    data_image = IMAGE_CONTEXT + "\n"
    turn_open = "<|im_start|>{role}\n"
    turn_close = "<|im_end|>\n"

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None = None, chat_template: str | None = None,
                 chat_template_source: str | None = None):
        # Only the image placeholder is checked: InternVL's tokenizer has no video token, so the base
        # __init__ (which checks both) is not called and its fields are set here. The prompt is built by
        # apply_chat_template below; a checkpoint's template is kept for the record (i22's contract).
        self.cfg, self.tokenizer = cfg, tokenizer
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source or "the InternVL3 prompt of apply_chat_template"
        self.video_num_frames: int | None = None
        self.video_fps: float | None = None
        if tokenizer is not None and tokenizer.token_to_id(IMAGE_CONTEXT) != cfg.tokens.image_token_id:
            raise ValueError(f"the tokenizer maps {IMAGE_CONTEXT} to {tokenizer.token_to_id(IMAGE_CONTEXT)} but the "
                             f"model config expects {cfg.tokens.image_token_id} (cfg.tokens)")

    def pre_llm_reducer(self, token_reduction: object = None) -> Reducer | None:
        """The pre-LLM method of ``token_reduction`` (None: the card's ``token_reduction``; ``[]``: none)."""
        spec = self.cfg.token_reduction if token_reduction is None else token_reduction
        return next((r for r in parse_reduction(spec) if r.where == PRE_LLM), None)

    def num_image_tokens(self, image_size: Sequence[int], token_reduction: object = None) -> int:
        """Visual tokens (``<IMG_CONTEXT>`` copies) for an image of ``(height, width)``."""
        tiles = num_tiles(*image_size, self.cfg.vision.image_size, self.cfg.processing.max_tiles)
        reducer = self.pre_llm_reducer(token_reduction)
        if reducer is not None:
            return reduced_image_tokens(self.cfg, reducer, tiles)
        return tiles * self.cfg.vision.tokens_per_tile

    def _tokenize(self, texts: list[str], image_counts: list[int], video_counts: list[int]) -> list[list[int]]:
        """Wrap each bare ``<IMG_CONTEXT>`` in ``<img>...</img>`` (as transformers does), then expand it."""
        bare = re.compile(f"(?<!{re.escape(IMAGE_START)}){re.escape(IMAGE_CONTEXT)}")
        wrapped = [bare.sub(IMAGE_START + IMAGE_CONTEXT + IMAGE_END, t) for t in texts]
        return super()._tokenize(wrapped, image_counts, video_counts)

    def preprocess(
        self, texts: list[str] | None, images: Any, videos: Any, token_reduction: object = None
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """``pixel_values [tiles, 3, S, S]`` of every image (in placeholder order), and each image's token count.

        Args:
            texts: The prompts (None for pixels only), one ``<IMG_CONTEXT>`` per image.
            images: One image, a flat list in placeholder order, or one list per sample.
            videos: Refused (pass the frames as images).
            token_reduction: The spec the model will run (None: the card's): ``pooling`` changes the counts.
        """
        if videos is not None or (texts is not None and any(self.video_token in t for t in texts)):
            raise InputError("InternVL takes no videos here: pass a video's frames as images, one <IMG_CONTEXT> each "
                             "(transformers writes 'Frame1: <img>...</img>' per frame)")
        image_list = _flat_images(images)
        if texts is not None:
            placed = sum(t.count(IMAGE_CONTEXT) for t in texts)
            if placed != len(image_list):
                raise InputError(f"the text holds {placed} {IMAGE_CONTEXT} placeholders but {len(image_list)} images "
                                 "were passed")
        tiles = [image_tiles(image, index, self.cfg) for index, image in enumerate(image_list)]
        reducer = self.pre_llm_reducer(token_reduction)
        if reducer is not None and reducer.needs_tower_attention:
            raise ReductionSpecError(f"token_reduction: {reducer.name} is not available for InternVL (see "
                                     "visorlib.models.internvl.model); pooling is")
        counts = [reduced_image_tokens(self.cfg, reducer, len(t)) if reducer is not None
                  else len(t) * self.cfg.vision.tokens_per_tile for t in tiles]
        return ({"pixel_values": torch.cat(tiles)} if tiles else {}), counts, []

    @staticmethod
    def apply_chat_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The InternVL3 (ChatML) prompt: ``<|im_start|>{role}\n{parts}<|im_end|>\n`` per message, no
        default system turn, each image part as ``<IMG_CONTEXT>\n``, the parts in their order."""
        pieces = []
        # The shared check (processing/templates.py): string content becomes one text part, unknown part types are errors.
        for message in normalize_messages(messages):
            body = "".join(part["text"] if part["type"] == "text" else
                           IMAGE_CONTEXT + "\n" if part["type"] in ("image", "image_url") else "<video>\n"
                           for part in message["content"])
            pieces.append(f"<|im_start|>{message['role']}\n{body}<|im_end|>\n")
        if add_generation_prompt:
            pieces.append("<|im_start|>assistant\n")
        return "".join(pieces)

    def profile_inputs(self, image: Any, n_text: int, seed: int = 0,
                       token_reduction: object = None) -> tuple[torch.Tensor, dict[str, Any], int]:
        """A one-image prompt with ``n_text`` random ordinary text ids around the placeholders.

        For measuring cost without a tokenizer (``visorlib profile``). Returns ``(input_ids [1, L],
        vision inputs, tiles through the vision tower)``.
        """
        vision = self(images=[image], token_reduction=token_reduction)
        tiles = vision["pixel_values"].shape[0]
        n_visual = self.num_image_tokens(to_chw_tensor(image, 0).shape[-2:], token_reduction)
        return self.profile_ids(n_visual, n_text, seed), vision, tiles
