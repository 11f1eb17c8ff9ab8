"""What every model family shares: the token sequence, the VISOR language model and the output.

Families differ in how pixels become visual tokens (LLaVA-OneVision: tiles, a projector and row
newlines; Qwen2-VL: patches at any resolution and a 2x2 merger) and in the rotary positions they
give them. From there on the path is the same and is written once, in :class:`VisionLanguageModel`,
the base class of every family model:

* :meth:`~VisionLanguageModel.scatter_media` embeds the text, writes every image's and video's
  tokens over its run of placeholder ids, numbers the visual tokens by image (``segments``, which
  the cross-attention's positional convolution needs) and puts the router's learned token where
  the routing id sits;
* ``self.language_model`` — the :class:`~visorlib.visor.VisorLanguageModel`, an ``nn.Module`` that
  owns the decoder and the VISOR blocks — takes that :class:`Embedded` record and does the rest
  (positions, the decoder under the plan, the router, logits and loss);
* :meth:`~VisionLanguageModel.route` runs only the routing phase (what router training uses).

A family implements ``embed_inputs`` (its media -> :class:`Embedded`) and ``forward`` (its
Hugging Face-style arguments), which ends ``return self.language_model(input_ids, embedded,
attention_mask, position_ids, labels, cache, logits_to_keep, sa_layers, in_llm_reducers)``.
``decoder``, ``plan``, ``cross_attention``, ``router`` and ``packer`` read the language model's
parts (read-only), and checkpoints keep their names (``decoder.*``, not
``language_model.decoder.*``). Inputs are checked with :mod:`visorlib.validation` (what is
checked: ``docs/inputs.md``): ids inside the vocabulary, finite pixels and embeddings, each
sample's placeholders against its own images, no all-padding row. A decode step pays one small
reduction and one host sync for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from ..generation import GenerationMixin
from ..hub import PretrainedMixin
from ..modules.cache import KVCache
from ..registry import resolve
from ..validation import (
    InputError,
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
from ..visor import VisorReport
from ..visor.language_model import (
    Embedded,
    ModelOutput,
    VisorLanguageModel,
    flat_state_dict_keys,
    nested_state_dict_keys,
)
from ..visor.reduction import IN_LLM, PRE_LLM, Reducer, parse_reduction
from ..visor.token_packing import widen_projector

__all__ = ["Embedded", "InputError", "Media", "ModelOutput", "VisionLanguageModel"]


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


class VisionLanguageModel(GenerationMixin, PretrainedMixin, nn.Module):
    """A family model: its vision side, a decoder, and the VISOR language model that runs it.

    Subclasses build ``vision_tower`` and ``projector`` (and ``image_newline``) in ``__init__``
    before calling :meth:`_finish_init`, and implement ``embed_inputs`` and ``forward``.

    Attributes:
        cfg: The card, resolved (:func:`visorlib.registry.resolve`).
        language_model: The :class:`~visorlib.visor.VisorLanguageModel`: the decoder, the VISOR
            blocks and the forward pass after the embeddings.
        decoder, plan, cross_attention, router, packer: The language model's parts, read-only
            (state-dict names ``decoder.*``, ``cross_attention.*``, ``router.*`` as always).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = resolve(cfg)
        parse_reduction(self.cfg.token_reduction, f"{self.cfg.name}: token_reduction")  # a bad card fails at build
        # Checkpoints name the language model's parts without its prefix (every visorlib checkpoint does).
        self.register_state_dict_post_hook(flat_state_dict_keys)
        self.register_load_state_dict_pre_hook(nested_state_dict_keys)

    def _finish_init(self, decoder: nn.Module | None = None) -> None:
        """Build the language model from the card (after the vision side exists).

        ``decoder``: an existing decoder to keep (``visorize`` turns a dense model into a VISOR one).
        Under token packing the projector's first layer is widened to read the packed tokens.
        """
        self.language_model = VisorLanguageModel(self.cfg, decoder)
        if self.language_model.packer is not None:
            self.projector.linear_1 = widen_projector(self.projector.linear_1)

    @property
    def cfg(self) -> ModelConfig:
        """The card (resolved). Setting it (``visorize``, a test shrinking a limit) sets the language model's too."""
        return self._cfg

    @cfg.setter
    def cfg(self, value: ModelConfig) -> None:
        self._cfg = value
        language_model = self._modules.get("language_model")
        if language_model is not None:
            language_model.cfg = value

    # The language model's parts, read where the family and the callers always found them.
    decoder = property(lambda self: self.language_model.decoder, doc="The decoder (owned by ``language_model``).")
    plan = property(lambda self: self.language_model.plan, doc="The VISOR layer plan (dense for a dense card).")
    cross_attention = property(lambda self: self.language_model.cross_attention, doc="Cross-attention blocks, or None.")
    router = property(lambda self: self.language_model.router, doc="The configuration router, or None.")
    packer = property(lambda self: self.language_model.packer, doc="The VISOR-TR token packer, or None.")

    def parameters_for(self, stage: int | str, freeze_vision_tower: bool = False) -> dict[str, nn.Parameter]:
        """The parameters training ``stage`` updates, by their names in this model (``named_parameters``).

        The language model's own set (:meth:`~visorlib.visor.VisorLanguageModel.parameters_for`),
        plus the family's parts: under token packing stage 1 also trains the widened first
        projector layer; stage 2 trains the vision side too, unless ``freeze_vision_tower``.
        Parameters with ``requires_grad=False`` (frozen by the family) are never included.
        """
        prefix = "language_model."
        chosen = {prefix + n: p for n, p in self.language_model.parameters_for(stage).items()}
        if stage == 1 and self.packer is not None:
            chosen.update((f"projector.linear_1.{n}", p) for n, p in self.projector.linear_1.named_parameters())
        elif stage == 2:
            chosen.update((n, p) for n, p in self.named_parameters()
                          if not n.startswith(prefix) and not (freeze_vision_tower and n.startswith("vision_tower.")))
        return {n: p for n, p in chosen.items() if p.requires_grad}

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
        return self.language_model.route(input_ids, self.embed_inputs(input_ids, None, **media), attention_mask)

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
        routing_mask = self.language_model.routing_mask(input_ids)
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

    def new_cache(self) -> KVCache:
        """An empty cache sized for this model."""
        return KVCache(self.cfg.decoder.num_layers)
