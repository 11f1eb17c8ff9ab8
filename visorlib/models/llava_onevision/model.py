"""LLaVA-OneVision: SigLIP tower -> 2-layer MLP projector -> Qwen2 decoder.

Reference: Li et al., "LLaVA-OneVision: Easy Visual Task Transfer" (https://arxiv.org/abs/2408.03326).
Every tile goes through the vision tower; tile features are projected to the decoder width,
stitched into one grid per image (see :mod:`visorlib.processing.anyres`), and written into the
token sequence in place of the image placeholder tokens. Inputs use the Hugging Face layout
(``pixel_values [images, tiles, 3, S, S]``, ``image_sizes [images, 2]``) so code moves freely
between the two libraries; the logits are the same to ~1e-6 in fp32.

**Pre-LLM token reduction** (``token_reduction=``, ``docs/token-reduction.md``) runs per tile
between the tower (and VISOR-TR packing) and the projector: tower -> (packer) -> reducer ->
projector. Selection and merging leave no 2-D grid, so a reduced image is laid out as its tiles'
kept tokens in tile order (base tile first, then the grid tiles row-major; within a tile in
their original row-major order), followed by one ``image_newline``. Unpadding and anyres'
bilinear downscale do not apply (the paper disabled the downscale too), so the token count
depends only on the spec and the tile count (:func:`~visorlib.visor.reduction.pre_llm_tokens`).
A reducer that keeps every token (``keep: 1.0``, :func:`~visorlib.visor.reduction.drops_nothing`)
is no reduction: the image keeps the unreduced layout, so the logits are the unreduced model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from ...modules.cache import KVCache
from ...processing import anyres
from ...registry import build_vision_tower
from ...validation import require_tensor
from ...visor.reduction import Reducer, ReductionSpecError, drops_nothing, encode_and_reduce
from ..base import Embedded, InputError, Media, ModelOutput, VisionLanguageModel


class Projector(nn.Module):
    """``linear_2(act(linear_1(x)))``: vision width -> decoder width."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        if act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"unsupported projector activation {act!r}")
        self.approximate = "tanh" if act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate=self.approximate))


class LlavaOnevision(VisionLanguageModel):
    """LLaVA-OneVision, dense or (with a card's ``visor`` section) VISOR.

    Args:
        cfg: A parsed zoo card (or one converted from a Hugging Face ``config.json``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        cfg = self.cfg
        self.vision_tower = build_vision_tower(cfg.vision)
        self.projector = Projector(cfg.vision.hidden_size, cfg.decoder.hidden_size, cfg.projector_act)
        self.image_newline = nn.Parameter(torch.empty(cfg.decoder.hidden_size)) if cfg.use_image_newline else None
        self._finish_init()

    # ------------------------------------------------------------------ vision
    def _tiles_per_image(self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None) -> list[int]:
        """Tiles each image was cut into: anyres for single-image samples, base tile only otherwise."""
        tile, pinpoints = self.cfg.vision.image_size, self.cfg.processing.pinpoints(self.cfg.vision.image_size)
        if batch_num_images is None:
            tiled = [True] * len(image_sizes)
        else:
            tiled = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
            if len(tiled) != len(image_sizes):
                raise InputError(
                    f"batch_num_images sums to {len(tiled)} but image_sizes describes {len(image_sizes)} images"
                )
        return [anyres.num_tiles(size.tolist(), pinpoints, tile) if t else 1 for size, t in zip(image_sizes, tiled, strict=False)]

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None,
        batch_num_images: torch.Tensor | None = None,
        reducer: Reducer | None = None,
    ) -> list[torch.Tensor]:
        """Visual tokens of every image, in the decoder's width.

        Args:
            pixel_values: ``[images, max_tiles, 3, S, S]`` (zero-padded past each image's tiles).
                With ``processing.aspect_mode: pad`` (FastVLM) every image is one tile, and
                ``[images, 3, S, S]`` (transformers' FastVLM layout) is accepted too.
            image_sizes: ``[images, 2]`` original ``(height, width)``; not needed in ``pad`` mode.
            batch_num_images: Images per sample; samples with several images use base tiles only.
            reducer: A pre-LLM reducer: each image becomes its tiles' kept tokens and one newline
                (the layout in the module docstring).

        Returns:
            One ``[tokens_i, D]`` tensor per image.
        """
        side = self.cfg.vision.image_size
        if self.cfg.processing.aspect_mode == "pad":
            if pixel_values.dim() == 5 and pixel_values.shape[1] == 1:
                pixel_values = pixel_values[:, 0]
            if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, side, side):
                raise InputError(
                    f"pixel_values must be [images, 3, {side}, {side}] or [images, 1, 3, {side}, {side}] (one padded "
                    f"square tile per image), got {list(pixel_values.shape)}"
                )
            if reducer is not None:
                return self._reduced_images(pixel_values, reducer, [1] * len(pixel_values), [(0, 0)] * len(pixel_values))
            return [self._pack_image(tile[None], None) for tile in self._tile_features(pixel_values)]
        if pixel_values.dim() != 5 or pixel_values.shape[2:] != (3, side, side):
            raise InputError(
                f"pixel_values must be [images, tiles, 3, {side}, {side}], got {list(pixel_values.shape)}"
            )
        if image_sizes is not None:
            require_tensor(image_sizes, "image_sizes")
        if image_sizes is None or image_sizes.shape != (pixel_values.shape[0], 2):
            got = None if image_sizes is None else list(image_sizes.shape)
            raise InputError(f"image_sizes must be [{pixel_values.shape[0]}, 2] (height, width per image), got {got}")
        empty = (image_sizes <= 0).any(1)
        if bool(empty.any()):
            index = int(empty.nonzero()[0, 0])
            raise InputError(f"image_sizes[{index}] is {image_sizes[index].tolist()}: image heights and widths must be "
                             "positive (the original size of each image, in pixels)")
        tiles = self._tiles_per_image(image_sizes, batch_num_images)
        for index, n in enumerate(tiles):
            if n > pixel_values.shape[1]:
                raise InputError(
                    f"image {index} of size {image_sizes[index].tolist()} needs {n} tiles but pixel_values holds "
                    f"{pixel_values.shape[1]}"
                )
        flat = torch.cat([pix[:n] for pix, n in zip(pixel_values, tiles, strict=False)])
        if reducer is not None:
            pinpoints = self.cfg.processing.pinpoints(side)
            grids = [anyres.tile_grid(size, pinpoints, side) if n > 1 else (0, 0)
                     for size, n in zip(image_sizes.tolist(), tiles, strict=True)]
            return self._reduced_images(flat, reducer, tiles, grids)
        features = self._tile_features(flat)
        return [self._pack_image(f, size) for f, size in zip(features.split(tiles), image_sizes.tolist(), strict=False)]

    def _tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tower -> (VISOR-TR packing) -> projector, per tile: ``[N, side**2, D]``."""
        features = self.vision_tower(pixels.to(self.dtype))
        if self.packer is not None:
            features = self.packer(features)
        return self.projector(features)

    def _reduced_images(
        self, pixels: torch.Tensor, reducer: Reducer, tiles: list[int], grids: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Tower -> (packer) -> ``reducer`` -> projector; one ``[kept tokens (+ newline), D]`` per image.

        Only kept rows go through the projector (HiRED pads tiles to the largest count; the padding
        is dropped first), so a tile's row count is exactly what the spec keeps.
        """
        _, reduced = encode_and_reduce(self.vision_tower, pixels.to(self.dtype), reducer, tiles, grids, self.packer)
        valid = torch.arange(reduced.features.shape[1], device=pixels.device) < reduced.counts[:, None]
        projected = self.projector(reduced.features[valid])  # rows in tile order, each tile's kept tokens in order
        per_image = torch.stack([part.sum() for part in reduced.counts.split(tiles)]).tolist()
        images = list(projected.split(per_image))
        if self.image_newline is None:
            return images
        return [torch.cat([image, self.image_newline[None].to(image)]) for image in images]

    def _pack_image(self, tiles: torch.Tensor, image_size: list[int] | None) -> torch.Tensor:
        """Stitch one image's tile features into an unpadded grid with row newlines."""
        base, grid_tiles = tiles[0], tiles[1:]
        if len(grid_tiles) == 0:
            return base if self.image_newline is None else torch.cat([base, self.image_newline[None].to(base)])
        side = self.cfg.feature_grid_size
        pinpoints = self.cfg.processing.pinpoints(self.cfg.vision.image_size)
        rows, cols = anyres.tile_grid(image_size, pinpoints, self.cfg.vision.image_size)
        # [rows*cols, side*side, D] -> [D, rows*side, cols*side]: tiles row-major, then patches.
        grid = grid_tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * side, cols * side)
        top, bottom, left, right = anyres.unpadded_crop(image_size, rows * side, cols * side)
        grid = grid[:, top:bottom, left:right]
        target = anyres.downscaled_size(grid.shape[1], grid.shape[2], side, self.cfg.processing.max_tiles)
        if target is not None:
            grid = F.interpolate(grid[None], list(target), mode="bilinear")[0]
        if self.image_newline is not None:
            newline = self.image_newline[:, None, None].to(grid).expand(-1, grid.shape[1], 1)
            grid = torch.cat([grid, newline], dim=-1)
        return torch.cat([base, grid.flatten(1).transpose(0, 1)])

    def encode_videos(self, pixel_values_videos: torch.Tensor, reducer: Reducer | None = None) -> list[torch.Tensor]:
        """Visual tokens of every video: frames pooled 2x (27² -> 14² tokens), then one newline.

        Args:
            pixel_values_videos: ``[videos, frames, 3, S, S]``.
            reducer: Refused when given: pre-LLM reduction of video frames is not supported.
        """
        if reducer is not None:
            raise ReductionSpecError(
                f"token_reduction: {reducer.name} is a pre-LLM method, and pre-LLM reduction of videos is not supported "
                "(frames are already pooled 2x, and the reduced token layout is defined for image tiles); use an "
                "in-LLM method (fastv, pyramiddrop) for videos"
            )
        side = self.cfg.vision.image_size
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[2:] != (3, side, side):
            raise InputError(
                f"pixel_values_videos must be [videos, frames, 3, {side}, {side}], got {list(pixel_values_videos.shape)}"
            )
        videos, frames = pixel_values_videos.shape[:2]
        features = self._tile_features(pixel_values_videos.flatten(0, 1))
        grid = self.cfg.feature_grid_size
        maps = features.view(videos * frames, grid, grid, -1).permute(0, 3, 1, 2)
        pooled = F.interpolate(maps, [math.ceil(grid / 2)] * 2, mode="bilinear").permute(0, 2, 3, 1)
        pooled = pooled.reshape(videos, -1, pooled.shape[-1])
        out = []
        for video in pooled:
            if self.image_newline is not None:
                video = torch.cat([video, self.image_newline[None].to(video)])
            out.append(video)
        return out

    # ---------------------------------------------------------------- sequence
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        token_reduction: object = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings with visual features written over the placeholder tokens.

        Args:
            token_reduction: A spec whose pre-LLM method reduces each image (None: the card's);
                its in-LLM methods act in the decoder and are ignored here.

        Returns:
            ``(embeddings [B, L, D], visual_mask [B, L], segments [B, L])``; ``segments`` numbers
            the batch's images, then its videos, on their tokens (-1 elsewhere).
        """
        pre_llm, _ = self.reducers(token_reduction)
        # A reducer that keeps every token is no reduction: the unreduced layout, row newlines and all.
        reducer = pre_llm[0] if pre_llm and not drops_nothing(pre_llm[0], self.cfg.feature_grid_size**2) else None
        # A processor that expanded the placeholders under another spec is the likely cause of a mismatch.
        hint = "" if reducer is None else (f" under token_reduction {reducer.name} (keep={reducer.keep}); the processor "
                                           "must be called with the same token_reduction")
        tokens = self.cfg.tokens
        groups = None
        if batch_num_images is not None:
            groups = require_tensor(batch_num_images, "batch_num_images").tolist()
        return self.scatter_media(input_ids, [
            Media("image", tokens.image_token_id, "<image>", pixel_values,
                  lambda: self.encode_images(pixel_values, image_sizes, batch_num_images, reducer), "pixel_values",
                  groups, hint=hint),
            Media("video", tokens.video_token_id, "<video>", pixel_values_videos,
                  lambda: self.encode_videos(pixel_values_videos, reducer), "pixel_values_videos", rows="video"),
        ])

    def embed_inputs(self, input_ids: torch.Tensor, cache: KVCache | None = None, pixel_values=None, image_sizes=None,
                     pixel_values_videos=None, batch_num_images=None, token_reduction=None) -> Embedded:
        """:meth:`embed`, as the shared decoder pass takes it (positions count real tokens)."""
        return Embedded(*self.embed(input_ids, pixel_values, image_sizes, pixel_values_videos, batch_num_images,
                                    token_reduction))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        sa_layers: object = None,
        token_reduction: object = None,
    ) -> ModelOutput:
        """Logits for a (possibly left-padded) batch.

        Args:
            input_ids: ``[B, L]`` with image/video placeholders already expanded.
            attention_mask: ``[B, L_cache + L]``; 0 marks padding. None means no padding.
            pixel_values: ``[images, tiles, 3, S, S]``.
            image_sizes: ``[images, 2]`` original ``(height, width)``.
            pixel_values_videos: ``[videos, frames, 3, S, S]``.
            batch_num_images: ``[B]`` images per sample (multi-image samples skip tiling).
            position_ids: ``[B, L]``; default counts real tokens, so left padding does not shift them.
            labels: ``[B, L]`` targets (-100 = ignore) for a next-token loss.
            cache: A :class:`KVCache` to fill (prefill) or extend (decode).
            logits_to_keep: Compute logits for the last N positions only (0 = all).
            sa_layers: VISOR configuration: None (the card's default), ``"all"``, ``"router"``, a list
                of SA layers, or one list per sample. A dense model accepts only None or ``"all"``.
                Ignored after the prefill: decode steps keep the prefill's configuration.
            token_reduction: Token reduction for the prefill (``docs/token-reduction.md``): a dict
                ``{"method": NAME, "keep": K, ...}`` or a list of them; None uses the card's, ``[]``
                none. A pre-LLM method reduces each image's tiles (the layout in the module
                docstring); ``input_ids`` must then hold the reduced counts, as
                ``processor(..., token_reduction=...)`` writes them. Videos refuse pre-LLM methods.
        """
        # The spec is parsed once: the vision path gets its parsed pre-LLM part, the decoder the in-LLM one.
        pre_llm, in_llm = self.reducers(token_reduction)
        embedded = self.embed_inputs(input_ids, cache, pixel_values, image_sizes, pixel_values_videos, batch_num_images,
                                     pre_llm)
        return self.language_model(input_ids, embedded, attention_mask, position_ids, labels, cache, logits_to_keep,
                                   sa_layers, in_llm)
