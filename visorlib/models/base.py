"""What every model family shares: the token sequence, the VISOR language model and the output.

Families differ in how pixels become visual tokens (LLaVA-OneVision: tiles, a projector and row
newlines; Qwen2-VL: patches at any resolution and a 2x2 merger) and in the rotary positions they
give them. From there on the path is the same and is written once, in :class:`VisionLanguageModel`,
the base class of every family model:

* :meth:`~VisionLanguageModel.scatter_media` embeds the text, writes every image's and video's
  tokens over its run of placeholder ids, numbers the visual tokens by image (``segments``, which
  the cross-attention's positional convolution needs) and puts the router's learned token where
  the routing id sits;
* :meth:`~VisionLanguageModel.run_language_model` checks the attention mask, asks the family for
  its rotary positions, runs the :class:`~visorlib.visor.VisorLanguageModel` (the decoder under the
  VISOR plan) and returns the logits (text positions only under a VISOR plan) and the loss;
* :meth:`~VisionLanguageModel.route` runs only the routing phase (what router training uses).

A family implements ``embed_inputs`` (its media -> :class:`Embedded`) and ``forward`` (its
Hugging Face-style arguments). Inputs are checked with :mod:`visorlib.validation` (what is
checked: ``docs/inputs.md``): ids inside the vocabulary, finite pixels and embeddings, each
sample's placeholders against its own images, no all-padding row. A decode step pays one small
reduction and one host sync for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from ..generation import GenerationMixin
from ..hub import PretrainedMixin
from ..modules.cache import KVCache
from ..modules.layers import positions_from_mask
from ..registry import build_decoder, resolve
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
from ..visor import VisorReport, attach_visor
from ..visor.reduction import IN_LLM, PRE_LLM, Reducer, parse_reduction

__all__ = ["Embedded", "InputError", "Media", "ModelOutput", "VisionLanguageModel"]


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
        logits: ``[B, L, vocab]`` (only the last ``logits_to_keep`` positions when that was set).
            Under a VISOR plan the visual positions carry no prediction and are zero. None with
            ``logits_to_keep=-1`` (loss only: the head ran on supervised positions alone).
        loss: Mean next-token cross-entropy over labels != -100, when ``labels`` were given.
        cache: The filled :class:`~visorlib.modules.cache.KVCache` when one was passed in.
        visor: What ran: the SA layers of each sample (after routing), how they were chosen and
            the router's logits (see :class:`~visorlib.visor.VisorReport`).
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    visor: VisorReport | None = None

    @property
    def sa_layers(self) -> list[list[int]] | None:
        """The configuration each sample ran (``visor.executed``)."""
        return None if self.visor is None else self.visor.executed

    @property
    def router_logits(self) -> torch.Tensor | None:
        """``[routing tokens, configurations]`` when the router decided (``visor.router_logits``)."""
        return None if self.visor is None else self.visor.router_logits


class Media(NamedTuple):
    """One kind of visual input of a forward pass, for :meth:`VisionLanguageModel.scatter_media`.

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
        hint: Appended to the token-count mismatch message (e.g. the active token reduction).
    """

    kind: str
    token_id: int
    placeholder: str
    pixels: object
    encode: Callable[[], list[torch.Tensor]]
    argument: str = "pixel_values"
    groups: Sequence[int] | None = None
    rows: str | Callable[[int], str] = "image"
    hint: str = ""


class Embedded(NamedTuple):
    """A batch's input embeddings and what the decoder pass needs to know about them.

    Attributes:
        embeds: ``[B, L, D]`` with visual tokens written over their placeholders.
        visual_mask: ``[B, L]``, True on visual tokens.
        segments: ``[B, L]`` image/video ordinal of each visual token (-1 elsewhere).
        positions: The family's rule ``(full attention mask) -> rotary positions`` of the new
            tokens; None counts real tokens (so left padding does not shift them).
    """

    embeds: torch.Tensor
    visual_mask: torch.Tensor
    segments: torch.Tensor
    positions: Callable[[torch.Tensor], torch.Tensor] | None = None


class VisionLanguageModel(GenerationMixin, PretrainedMixin, nn.Module):
    """A family model: its vision side, a decoder, and the VISOR language model that runs it.

    Subclasses build ``vision_tower`` and ``projector`` (and ``image_newline``) in ``__init__``
    before calling :meth:`_finish_init`, and implement ``embed_inputs`` and ``forward``.

    Attributes:
        cfg: The card, resolved (:func:`visorlib.registry.resolve`).
        decoder: The language model's decoder (state-dict prefix ``decoder.``).
        plan: The VISOR layer plan (the dense plan for a dense card).
        cross_attention, router, packer: The VISOR blocks (None when the card has none).
        language_model: The :class:`~visorlib.visor.VisorLanguageModel` composed of the above.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = resolve(cfg)
        parse_reduction(self.cfg.token_reduction, f"{self.cfg.name}: token_reduction")  # a bad card fails at build

    def _finish_init(self) -> None:
        """Build the decoder and attach the VISOR plan and blocks (after the vision side exists)."""
        self.decoder = build_decoder(self.cfg.decoder)
        attach_visor(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def embed_inputs(self, input_ids: torch.Tensor, cache: KVCache | None = None, **media) -> Embedded:
        """The family's media (its ``forward`` keyword arguments) embedded into ``input_ids``."""
        raise NotImplementedError

    def reducers(self, token_reduction: object = None) -> tuple[list[Reducer], list[Reducer]]:
        """``token_reduction`` (None: the card's ``token_reduction``) parsed into ``(pre_llm, in_llm)`` reducers.

        Pre-LLM reducers act in the family's vision path (``embed_inputs``); in-LLM ones inside the
        decoder. A family whose tower cannot serve a pre-LLM rule refuses it there.
        """
        spec = self.cfg.token_reduction if token_reduction is None else token_reduction
        parsed = parse_reduction(spec)
        return [r for r in parsed if r.where == PRE_LLM], [r for r in parsed if r.where == IN_LLM]

    # -- VISOR, delegated to the language model -------------------------------------------------
    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True on image/video placeholder positions."""
        return self.language_model.visual_token_mask(input_ids)

    def routing_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where the router's routing token sits (never, without a router)."""
        return self.language_model.routing_mask(input_ids)

    def supervised_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with positions a VISOR plan cannot supervise set to -100 (visual tokens and the next one)."""
        return self.language_model.supervised_labels(input_ids, labels)

    def init_visor_blocks(self) -> None:
        """Initialise the VISOR blocks from the (already loaded) dense weights."""
        self.language_model.init_blocks()

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **media) -> VisorReport:
        """Run only the routing phase and return the router's logits and choices.

        Args:
            input_ids: ``[B, L]``, each question followed by the routing token.
            attention_mask: ``[B, L]``, 0 on padding.
            **media: The family's visual inputs, as ``forward`` takes them (``pixel_values``,
                ``image_sizes`` / ``image_grid_thw``, ...).
        """
        if self.router is None:
            raise ValueError(f"{self.cfg.name} has no router")
        embedded = self.embed_inputs(input_ids, None, **media)
        mask = self._checked_mask(attention_mask, input_ids, 0)
        positions = self._positions(embedded, mask, 0)
        return self.language_model.route(embedded.embeds, positions, mask, embedded.visual_mask, embedded.segments,
                                         self.routing_mask(input_ids))

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
                    f"features{item.hint}; expand each {item.placeholder} placeholder with visorlib.processor_for(model)"
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
        embedded: Embedded,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: KVCache | None,
        logits_to_keep: int,
        sa_layers: object,
        reducers: Sequence[Reducer] = (),
    ) -> ModelOutput:
        """The decoder under the VISOR plan, then logits and (with ``labels``) the loss.

        Args:
            input_ids: ``[B, L]`` new tokens.
            embedded: From the family's ``embed_inputs``.
            attention_mask: ``[B, L_cache + L]``, 0 on padding; None means no padding.
            position_ids: Rotary positions of the new tokens; None asks ``embedded.positions``.
            labels: ``[B, L]`` targets (-100 = ignore) for a next-token loss.
            cache: A :class:`KVCache` to fill (prefill) or extend (decode).
            logits_to_keep: Compute logits for the last N positions only (0 = all; -1 = only the
                positions that have a target, for a memory-light training loss; ``logits`` is then None).
            sa_layers: VISOR configuration: None (the card's default), ``"all"``, ``"router"``, a
                list of SA layers, one list per sample, or a :class:`~visorlib.visor.LayerRequest`.
                Ignored after the prefill: decode steps keep the prefill's configuration.
            reducers: In-LLM token reduction for the prefill (see :meth:`reducers`).
        """
        batch, length = input_ids.shape
        past = cache.seen if cache is not None else 0
        attention_mask = self._checked_mask(attention_mask, input_ids, past)
        if position_ids is None:
            position_ids = self._positions(embedded, attention_mask, past)
        self._warn_past_positions(position_ids, past + length)
        request = self.language_model.request(None if past else sa_layers, batch)
        hidden, report = self.language_model.forward(embedded.embeds, position_ids, attention_mask, embedded.visual_mask,
                                                     embedded.segments, self.routing_mask(input_ids), request, cache,
                                                     () if past else reducers)
        if logits_to_keep < 0:
            if labels is None:
                raise ValueError("logits_to_keep=-1 (loss only) needs labels")
            loss = self.language_model.supervised_loss(hidden, input_ids, labels)
            return ModelOutput(logits=None, loss=loss, cache=cache, visor=report)
        logits = self.language_model.logits(hidden, embedded.visual_mask, logits_to_keep)
        loss = None if labels is None else self.language_model.loss(logits, input_ids, labels)
        return ModelOutput(logits=logits, loss=loss, cache=cache, visor=report)

    @staticmethod
    def _checked_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, past: int) -> torch.Tensor:
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        check_attention_mask(attention_mask, batch, past + length, prefill=past == 0)
        return attention_mask

    @staticmethod
    def _positions(embedded: Embedded, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        if embedded.positions is not None:
            return embedded.positions(attention_mask)
        return positions_from_mask(attention_mask)[:, past:]

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

    def new_cache(self) -> KVCache:
        """An empty cache sized for this model."""
        return KVCache(self.cfg.decoder.num_layers)
