"""The part of a vision-language model every family shares: the token sequence and the decoder pass.

Families differ in how pixels become visual tokens (LLaVA-OneVision: tiles, a projector and row
newlines; Qwen2-VL: patches at any resolution and a 2x2 merger) and in the rotary positions they
give them. From there on the path is the same and is written once, in :class:`MultimodalMixin`:

* :meth:`~MultimodalMixin.scatter_media` embeds the text, writes every image's and video's tokens
  over its run of placeholder ids, numbers the visual tokens by image (``segments``, which the
  cross-attention's positional convolution needs) and puts the router's learned token where the
  routing id sits;
* :meth:`~MultimodalMixin.run_language_model` checks the attention mask, asks the family for
  its rotary positions, runs the decoder under the VISOR plan and returns the logits (text
  positions only under a VISOR plan) and the next-token loss.

Both check their inputs with :mod:`visorlib.validation` (what is checked: ``docs/inputs.md``):
ids inside the vocabulary, finite pixels and embeddings, each sample's placeholders against its
own images, no all-padding row. A decode step pays one small reduction and one host sync for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..config import ModelConfig
from ..layers import positions_from_mask
from ..validation import (
    InputError,
    check_attention_mask,
    check_finite,
    check_media_per_sample,
    check_token_ids,
    first_nonfinite_row,
    flags,
    nonfinite,
    require_tensor,
    safe_token_ids,
    token_id_error,
)
from .executor import compact, gather_tokens, scatter_tokens

__all__ = ["InputError", "Media", "ModelOutput", "MultimodalMixin"]


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
        logits: ``[B, L, vocab]`` (only the last ``logits_to_keep`` positions when that was set).
            Under a VISOR plan the visual positions carry no prediction and are zero.
        loss: Mean next-token cross-entropy over labels != -100, when ``labels`` were given.
        cache: The filled :class:`~visorlib.cache.KVCache` when one was passed in.
        sa_layers: The configuration each sample ran (after routing).
        router_logits: ``[routing tokens, configurations]`` when the router decided.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    sa_layers: list[list[int]] | None = None
    router_logits: torch.Tensor | None = None


class Media(NamedTuple):
    """One kind of visual input of a forward pass, for :meth:`MultimodalMixin.scatter_media`.

    Attributes:
        kind: ``"image"`` or ``"video"`` (for messages).
        token_id: The placeholder id its tokens replace in ``input_ids``.
        placeholder: The placeholder's text (for messages).
        pixels: The pixel tensor, or None when none were given.
        encode: Computes the visual tokens, one ``[tokens, D]`` tensor per image/video.
        argument: The pixels' argument name (for messages).
        groups: Images per sample that has any (``batch_num_images``), when the caller knows them.
        rows: What dim 0 of ``pixels`` counts (``"image"``), or a function naming row ``i`` (for
            flattened patches: which image the patch belongs to).
    """

    kind: str
    token_id: int
    placeholder: str
    pixels: object
    encode: Callable[[], list[torch.Tensor]]
    argument: str = "pixel_values"
    groups: Sequence[int] | None = None
    rows: str | Callable[[int], str] = "image"


class MultimodalMixin:
    """Sequence assembly and the decoder pass, for models with ``cfg``, ``decoder``, ``plan``, ``router``."""

    cfg: ModelConfig

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def routing_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where the router's routing token sits (never, without a router)."""
        if self.router is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.cfg.visor.routing_token_id

    def scatter_media(
        self, input_ids: torch.Tensor, media: Sequence[Media]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings with visual tokens written over their placeholders.

        Args:
            input_ids: ``[B, L]`` with placeholders expanded (one id per visual token).
            media: The kinds of visual input, in the order their segments are numbered.

        Returns:
            ``(embeddings [B, L, D], visual_mask [B, L], segments [B, L])``; ``segments`` numbers
            the batch's images, then its videos, on their tokens (-1 elsewhere).
        """
        check_token_ids(input_ids)
        masks = [input_ids == m.token_id for m in media]
        visual_mask = torch.stack(masks).any(0) if masks else torch.zeros_like(input_ids, dtype=torch.bool)
        routing_mask = self.routing_mask(input_ids)
        table = self.decoder.embed_tokens
        placeholders = visual_mask | routing_mask
        # Placeholder ids may lie outside a shrunk vocabulary; they are overwritten anyway. A bad
        # id is reported below, together with the finiteness check, in one host sync.
        ids, bad_ids = safe_token_ids(input_ids, placeholders, table.num_embeddings)
        embeds = table(ids)
        if self.router is not None:
            embeds = torch.where(routing_mask[..., None], self.router.token.to(embeds.dtype), embeds)
        segments = torch.full_like(input_ids, -1)
        first_segment = 0
        missing = []  # kinds without pixels: their placeholders are an error, read back with the flags below
        for mask, item in zip(masks, media, strict=True):
            if item.pixels is None:
                missing.append((item, mask))
                continue
            slots = mask.sum(1).tolist()
            check_finite(require_tensor(item.pixels, item.argument), item.argument, item.rows)
            parts = item.encode()
            features = torch.cat(parts).to(embeds.dtype)
            if features.shape[0] != sum(slots):
                raise InputError(
                    f"input_ids contain {sum(slots)} {item.kind} tokens but the {item.kind}s produce {features.shape[0]} "
                    f"features; expand each {item.placeholder} placeholder with visorlib.processor_for(model)"
                )
            check_media_per_sample(slots, [len(p) for p in parts], item.kind, item.groups)
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), features)
            lengths = torch.tensor([len(p) for p in parts], device=input_ids.device)
            ordinals = torch.arange(len(parts), device=input_ids.device) + first_segment
            segments = segments.masked_scatter(mask, torch.repeat_interleave(ordinals, lengths))
            first_segment += len(parts)
        # Cost: one reduction over the ids, one over the embeddings (and one per kind without
        # pixels), read back in one host sync: all a decode step pays for its checks.
        bad_ids, bad_embeds, *stray = flags(bad_ids, nonfinite(embeds), *(mask.any() for _, mask in missing))
        for (item, mask), found in zip(missing, stray, strict=True):
            if found:
                raise InputError(f"input_ids contain {int(mask.sum())} {item.kind} tokens but no {item.kind} pixels "
                                 "were given")
        if bad_ids:
            raise token_id_error(input_ids, placeholders, table.num_embeddings)
        if bad_embeds:
            row = first_nonfinite_row(embeds)
            source = ("the visual features (vision tower / projector weights)" if bool(visual_mask[row].any())
                      else "the token embedding table")
            raise InputError(f"the input embeddings of sample {row} hold NaN or infinite values, from {source}; "
                             "the model would return NaN logits")
        return embeds, visual_mask, segments

    def run_language_model(
        self,
        input_ids: torch.Tensor,
        embedded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: KVCache | None,
        logits_to_keep: int,
        sa_layers: object,
        default_positions: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ModelOutput:
        """The decoder under the VISOR plan, then logits and (with ``labels``) the loss.

        Args:
            input_ids: ``[B, L]`` new tokens.
            embedded: ``(embeddings, visual_mask, segments)`` from :meth:`scatter_media`.
            attention_mask: ``[B, L_cache + L]``, 0 on padding; None means no padding.
            position_ids: Rotary positions of the new tokens; None asks ``default_positions``.
            labels: ``[B, L]`` targets (-100 = ignore) for a next-token loss.
            cache: A :class:`KVCache` to fill (prefill) or extend (decode).
            logits_to_keep: Compute logits for the last N positions only (0 = all; -1 = only the
                positions that have a target, for a memory-light training loss; ``logits`` is then None).
            sa_layers: VISOR configuration (see :meth:`~visorlib.models.visor.VisorMixin.resolve_configurations`).
            default_positions: The family's rule ``(full attention mask) -> positions``; the
                default counts real tokens, so left padding does not shift them.
        """
        embeds, visual_mask, segments = embedded
        batch, length = input_ids.shape
        past = cache.seen if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        check_attention_mask(attention_mask, batch, past + length, prefill=past == 0)
        if position_ids is None:
            position_ids = (default_positions or (lambda mask: positions_from_mask(mask)[:, past:]))(attention_mask)
        self._warn_past_positions(position_ids, past + length)
        hidden, configs, router_logits = self.run_decoder(
            embeds, position_ids, attention_mask, visual_mask, segments, self.routing_mask(input_ids), sa_layers, cache
        )
        if logits_to_keep < 0:
            if labels is None:
                raise ValueError("logits_to_keep=-1 (loss only) needs labels")
            # Training: the LM head runs only where a target exists, so memory is
            # supervised tokens x vocab instead of batch x length x vocab.
            targets = self.supervised_labels(input_ids, labels.to(hidden.device))[:, 1:]
            rows = targets != -100
            logits = self.decoder.logits(hidden[:, :-1][rows])
            # Sum / count (not the mean) so a micro-batch without targets gives 0, never NaN.
            loss = F.cross_entropy(logits.float(), targets[rows], reduction="sum") / rows.sum().clamp_min(1)
            return ModelOutput(logits=None, loss=loss, cache=cache, sa_layers=configs, router_logits=router_logits)
        logits = self._logits(hidden, visual_mask, logits_to_keep)
        loss = None
        if labels is not None:
            labels = self.supervised_labels(input_ids, labels.to(logits.device))
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, cache=cache, sa_layers=configs, router_logits=router_logits)

    def _warn_past_positions(self, position_ids: torch.Tensor, total: int) -> None:
        """Warn once when a position passes ``max_position_embeddings`` (RoPE runs, quality is unknown).

        Positions never exceed the token count, so the reduction runs only when the sequence is
        longer than the limit: ordinary steps pay nothing.
        """
        limit = self.cfg.decoder.max_position_embeddings
        if total <= limit or getattr(self, "_warned_positions", False):
            return
        largest = int(position_ids.max())
        if largest >= limit:
            self._warned_positions = True
            warnings.warn(
                f"input_ids reach position {largest} but {self.cfg.name} was trained for "
                f"max_position_embeddings={limit} positions; rotary positions run past it, but answers "
                "beyond that length are not reliable",
                UserWarning,
                stacklevel=4,
            )

    def _logits(self, hidden: torch.Tensor, visual_mask: torch.Tensor, keep: int) -> torch.Tensor:
        """LM head over every position (dense plan), or over text positions only (VISOR plans)."""
        if self.plan.dense:
            return self.decoder.logits(hidden[:, -keep:] if keep else hidden)
        if keep:
            return self.decoder.logits(hidden[:, -keep:]) * (~visual_mask[:, -keep:])[..., None]
        index, _ = compact(~visual_mask)
        text_logits = self.decoder.logits(gather_tokens(hidden, index))
        return scatter_tokens(text_logits.new_zeros(*hidden.shape[:2], text_logits.shape[-1]), index, text_logits)

    def new_cache(self) -> KVCache:
        """An empty cache sized for this model."""
        return KVCache(self.cfg.decoder.num_layers)
