"""InternVL3: InternViT tiles -> pixel shuffle -> LayerNorm + 2-layer MLP projector -> Qwen2.5 decoder.

Reference: Zhu et al., "InternVL3: Exploring Advanced Training and Test-Time Recipes for
Open-Source Multimodal Models" (https://arxiv.org/abs/2504.10479); transformers'
``InternVLForConditionalGeneration`` is the oracle of the tests. The decoder is the shared Qwen2
decoder with plain 1-D RoPE (positions are counted, as for LLaVA-OneVision).

**Inputs** follow transformers: ``pixel_values [tiles, 3, 448, 448]``, every image's tiles one
after the other (the processor's dynamic tiles, then a thumbnail when there is more than one
tile), and each image written in the text as ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile +
``</img>``. Nothing else says which tiles belong to which image: as in transformers, the
features are written over the placeholders in order, and visorlib takes each *run* of
consecutive ``<IMG_CONTEXT>`` tokens as one image (its VISOR segment: the cross-attention's
positional convolution runs within it). Video frames are images of one tile each (the processor
writes ``Frame1: <img>...</img>`` per frame).

**Token reduction.** The tower's tokens keep a grid (16x16 per tile after the shuffle), so
``pooling`` (average pooling over each tile's grid) runs before the projector, each image
becoming its tiles' pooled tokens in order. The methods that score tokens by the tower's own
attention (``visionzip``, ``vispruner``, ``hired``) are refused: InternViT's attention is over
32x32 patches plus a class token, not over the shuffled tokens the decoder sees. In-LLM methods
(``fastv``, ``pyramiddrop``) work as for every family. VISOR-TR token packing is not offered
(the projector's first layer is preceded by a LayerNorm over the folded width, which the packer's
widening of ``linear_1`` does not account for).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from ...modules.cache import KVCache
from ...registry import build_vision_tower
from ...validation import require_tensor
from ...visor.reduction import Reducer, ReductionSpecError, apply_pre_llm
from ..base import Embedded, InputError, Media, ModelOutput, VisionLanguageModel

IMAGE_CONTEXT = "<IMG_CONTEXT>"


class InternVLProjector(nn.Module):
    """``linear_2(gelu(linear_1(layer_norm(x))))``: folded tower width -> decoder width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=1e-5)  # transformers' default eps (not the tower's)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))


def image_runs(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in ``input_ids [B, L]``, row by row, left to right."""
    runs = []
    for row in (input_ids == token_id):
        values, counts = torch.unique_consecutive(row, return_counts=True)
        runs += counts[values].tolist()
    return runs


class InternVL(VisionLanguageModel):
    """InternVL3: InternViT with pixel shuffle (``vision_tower``), MLP ``projector``, Qwen2 decoder.

    Args:
        cfg: A zoo card, or the config converted from a Hugging Face InternVL ``config.json``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.vision_tower = build_vision_tower(self.cfg.vision)
        self.projector = InternVLProjector(self.cfg.vision.hidden_size, self.cfg.decoder.hidden_size)
        self.image_newline = None  # tiles follow each other; no row-end token
        self._finish_init()

    def encode(self, pixel_values: torch.Tensor, runs: list[int], reducer: Reducer | None = None) -> list[torch.Tensor]:
        """Visual tokens per image: the tiles' tokens in order, cut at the placeholder runs.

        Args:
            pixel_values: ``[tiles, 3, S, S]`` normalised tiles of every image, in order.
            runs: ``<IMG_CONTEXT>`` run lengths (one per image) that the tokens are cut into.
            reducer: A pre-LLM method (``pooling``): every tile keeps its pooled tokens.
        """
        side = self.cfg.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, side, side):
            raise InputError(f"pixel_values must be [tiles, 3, {side}, {side}] (every image's tiles in order), "
                             f"got {list(pixel_values.shape)}")
        features = self.vision_tower(pixel_values.to(self.dtype), self.cfg.attn_implementation)
        if reducer is not None:
            reduced = apply_pre_llm(reducer, features, None)
            valid = torch.arange(reduced.features.shape[1], device=features.device) < reduced.counts[:, None]
            tokens = self.projector(reduced.features[valid])
        else:
            tokens = self.projector(features.flatten(0, 1))
        if sum(runs) != len(tokens):
            # scatter_media words the count mismatch; hand it one part so it can.
            return [tokens]
        return list(tokens.split(runs))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              token_reduction: object = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeddings, visual_mask, segments)`` with visual tokens over the ``<IMG_CONTEXT>`` runs."""
        pre_llm, _ = self.reducers(token_reduction)
        reducer = pre_llm[0] if pre_llm else None
        if pixel_values is not None:
            require_tensor(pixel_values, "pixel_values")
        token = self.cfg.tokens.image_token_id
        hint = "" if reducer is None else f" under token_reduction {reducer.name} (keep={reducer.keep})"
        return self.scatter_media(input_ids, [
            Media("image", token, IMAGE_CONTEXT, pixel_values,
                  lambda: self.encode(pixel_values, image_runs(input_ids, token), reducer), "pixel_values",
                  rows="tile", hint=hint),
        ])

    def embed_inputs(self, input_ids: torch.Tensor, cache: KVCache | None = None, pixel_values=None,
                     token_reduction: object = None) -> Embedded:
        """:meth:`embed`; positions are counted (1-D RoPE)."""
        return Embedded(*self.embed(input_ids, pixel_values, token_reduction))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None, logits_to_keep: int = 0,
                sa_layers: object = None, token_reduction: object = None) -> ModelOutput:
        """Logits for a (possibly left-padded) batch: the contract of :meth:`LlavaOnevision.forward`.

        Args:
            input_ids: ``[B, L]`` with every image's ``<IMG_CONTEXT>`` run expanded (256 per tile).
            pixel_values: ``[tiles, 3, S, S]``: all images' tiles, in order of their runs.
            token_reduction: ``pooling`` (pre-LLM, per tile) and the in-LLM methods; see the module docstring.
        """
        pre_llm, in_llm = self.reducers(token_reduction)
        if pre_llm and pre_llm[0].needs_tower_attention:
            raise ReductionSpecError(
                f"token_reduction: {pre_llm[0].name} scores tokens by the vision tower's attention, which InternViT "
                "computes over its 32x32 patches and class token, not over the pixel-shuffled tokens the decoder "
                "sees; pooling (pre-LLM) and fastv / pyramiddrop (in-LLM) work with this family")
        # The spec is parsed once: the vision path gets its parsed pre-LLM part, the decoder the in-LLM one.
        embedded = self.embed_inputs(input_ids, cache, pixel_values, pre_llm)
        return self.language_model(input_ids, embedded, attention_mask, position_ids, labels, cache, logits_to_keep,
                                   sa_layers, in_llm)
