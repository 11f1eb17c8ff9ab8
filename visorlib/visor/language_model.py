"""The VISOR language model: an ``nn.Module`` that owns the decoder and the VISOR blocks, and runs them.

A family model (``visorlib/models/<family>/``) turns ids and pixels into one :class:`Embedded`
record; everything after that is this module, which *owns* its parts — the family's decoder, the
cross-attention blocks at the CA layers, the configuration router and the token packer — and says
which of them each training stage updates (:meth:`VisorLanguageModel.parameters_for`,
:meth:`VisorLanguageModel.visor_parameters`). :meth:`VisorLanguageModel.forward` is the whole
path after the embeddings, top to bottom:

1. **where the tokens are** — the attention mask is checked and the rotary positions taken from
   the family's rule (:meth:`Embedded.rotary_positions`);
2. **what to run** — ``sa_layers`` is parsed once into a :class:`~visorlib.visor.request.LayerRequest`
   (a decode step keeps the prefill's configuration);
3. **the decoder layers** — the :class:`~visorlib.visor.executor.PlanExecutor` runs them under the
   plan; when the router decides, in two phases: the layers every configuration shares, then the
   router reads the text states at the routing tokens and picks per sample, then the rest;
4. **the head** — logits (text positions only under a VISOR plan) and, with labels, the loss.

Checkpoints keep the names they always had (``decoder.*``, ``cross_attention.*``, ``router.*``):
the family model drops this module's ``language_model.`` prefix when it writes a state dict and
adds it back when it reads one (:func:`flat_state_dict_keys`, :func:`nested_state_dict_keys`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..modules.cache import KVCache
from ..modules.layers import positions_from_mask
from ..registry import build_decoder
from ..validation import check_attention_mask
from .cross_attention import CrossAttention
from .executor import PlanExecutor
from .plan import LayerPlan
from .pruning import Pruning
from .reduction import Reducer
from .request import LayerRequest, VisorReport, layer_mask
from .router import ConfigurationRouter, route_configs
from .streams import compact, gather_tokens, scatter_tokens
from .token_packing import TokenPacker

#: The parts this module owns, by the name a checkpoint stores them under (no prefix).
PARTS = ("decoder", "cross_attention", "router", "packer")
PREFIX = "language_model."
#: What a training stage updates: 1 = the new blocks, 2 = everything but the router, "router".
STAGES = (1, 2, "router")


class Embedded(NamedTuple):
    """What a family hands the language model: a batch's input embeddings and what the pass needs to know.

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

    def rotary_positions(self, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        """Rotary positions of the new tokens under ``attention_mask`` (``[B, past + L]``)."""
        if self.positions is not None:
            return self.positions(attention_mask)
        return positions_from_mask(attention_mask)[:, past:]


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


class VisorLanguageModel(nn.Module):
    """The decoder under a VISOR plan, with the blocks VISOR adds (dense when the card has no ``visor`` section).

    Args:
        cfg: The model's card (resolved).
        decoder: An existing decoder to own (``visorize`` keeps the dense model's); None builds
            the card's.

    Attributes:
        plan: Layer roles and configurations (:class:`~visorlib.visor.plan.LayerPlan`).
        decoder: The family's decoder (embedding, layers, rotary table, norm, head).
        cross_attention: Cross-attention blocks keyed by layer index, or None.
        router: The configuration router, or None.
        packer: VISOR-TR's parameter-free token packer (the family's vision path applies it), or None.
    """

    def __init__(self, cfg: ModelConfig, decoder: nn.Module | None = None):
        super().__init__()
        visor, decoder_cfg = cfg.visor, cfg.decoder
        self.cfg = cfg
        self.plan = LayerPlan(decoder_cfg.num_layers, visor)
        self.decoder = build_decoder(decoder_cfg) if decoder is None else decoder
        self.cross_attention = self.router = self.packer = None
        if visor is not None:
            gated = visor.cross_attention_init == "zero_gate"
            self.cross_attention = nn.ModuleDict(
                {str(i): CrossAttention(decoder_cfg, visor.conv_kernel, gated) for i in self.plan.ca_layers})
            if visor.router:
                self.plan.router_layer  # noqa: B018 - raises early if no layer can be skipped
                self.router = ConfigurationRouter(decoder_cfg.hidden_size, visor.router_hidden,
                                                  len(self.plan.configurations))
            if visor.packing_ratio > 1:
                self.packer = TokenPacker(cfg.vision.grid_size, visor.packing_ratio)
        self.observer = None  # a read-only probe of every prefill (visorlib.analysis sets it for one pass)
        self._warned_positions = False

    # -- what each training stage updates -------------------------------------------------------
    def visor_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters VISOR adds to the dense decoder (cross-attention and router), by name in this module."""
        return {n: p for n, p in self.named_parameters() if n.split(".")[0] in ("cross_attention", "router")}

    def parameters_for(self, stage: int | str) -> dict[str, nn.Parameter]:
        """The parameters of this module that training ``stage`` updates, by name in this module.

        Stage 1 trains the new cross-attention blocks on the frozen dense model; stage 2 every part
        but the router; the ``"router"`` stage only the router. (The family adds its own parts —
        the widened projector under token packing, the vision tower — in
        :meth:`~visorlib.models.base.VisionLanguageModel.parameters_for`.)
        """
        if stage not in STAGES:
            raise ValueError(f"training stage {stage!r}: expected one of {STAGES}")
        part = {1: lambda p: p == "cross_attention", 2: lambda p: p != "router", "router": lambda p: p == "router"}[stage]
        return {n: p for n, p in self.named_parameters() if part(n.split(".")[0])}

    @torch.no_grad()
    def init_blocks(self) -> None:
        """Initialise the VISOR blocks from the (already loaded) dense weights."""
        if self.cfg.visor is None:
            return
        for index, block in self.cross_attention.items():
            if self.cfg.visor.cross_attention_init == "copy":
                block.copy_from(self.decoder.layers[int(index)])
            else:
                block.reset_random()
        if self.router is not None:
            self.router.reset_parameters()

    # -- the forward path ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        embedded: Embedded,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        sa_layers: object = None,
        reducers: Sequence[Reducer] = (),
    ) -> ModelOutput:
        """The decoder under the VISOR plan, then logits and (with ``labels``) the loss.

        Args:
            input_ids: ``[B, L]`` new tokens (the routing token and placeholders are read from them).
            embedded: The family's :class:`Embedded` (its ``embed_inputs``).
            attention_mask: ``[B, L_cache + L]``, 0 on padding; None means no padding.
            position_ids: Rotary positions of the new tokens; None asks ``embedded``.
            labels: ``[B, L]`` targets (-100 = ignore) for a next-token loss.
            cache: A :class:`KVCache` to fill (prefill) or extend (decode).
            logits_to_keep: Logits for the last N positions only (0 = all; -1 = only the positions
                that have a target, for a memory-light training loss; ``logits`` is then None).
            sa_layers: VISOR configuration: None (the card's default), ``"all"``, ``"router"``, a
                list of SA layers, one list per sample, or a :class:`~visorlib.visor.LayerRequest`.
                Ignored after the prefill: decode steps keep the prefill's configuration.
            reducers: In-LLM token reduction for the prefill (the family's ``reducers``).
        """
        # 1. Where the tokens are: padding, the cache's past, rotary positions.
        batch, length = input_ids.shape
        past = cache.seen if cache is not None else 0
        attention_mask = self.checked_mask(attention_mask, input_ids, past)
        if position_ids is None:
            position_ids = embedded.rotary_positions(attention_mask, past)
        self._warn_past_positions(position_ids, past + length)
        # 2. What to run: sa_layers parsed once; a decode step attends over what the prefill cached.
        request = self.request(None if past else sa_layers, batch)
        # 3. The decoder layers under the plan (two phases around the router when it decides).
        executor = self.executor(() if past else reducers)
        state = executor.start(embedded.embeds, position_ids, attention_mask, embedded.visual_mask, embedded.segments,
                               cache)
        table = request.mask(self.plan.num_layers, embedded.embeds.device)
        if request.routed and not past:
            first = self.plan.router_layer + 1
            executor.run_layers(state, table, range(first))
            logits, owners, chosen = self._route(state, self.routing_mask(input_ids), batch)
            table = layer_mask(chosen, self.plan.num_layers, embedded.embeds.device)
            executor.run_layers(state, table, range(first, self.plan.num_layers))
            report = VisorReport(chosen, "router", logits, owners)
        else:
            executor.run_layers(state, table, range(self.plan.num_layers))
            report = VisorReport([list(c) for c in request.configurations], request.how)
        hidden = executor.finish(state)
        # 4. The head: text positions only under a VISOR plan; the loss where labels ask for it.
        if logits_to_keep < 0:
            if labels is None:
                raise ValueError("logits_to_keep=-1 (loss only) needs labels")
            return ModelOutput(None, self.supervised_loss(hidden, input_ids, labels), cache, report)
        logits = self.logits(hidden, embedded.visual_mask, logits_to_keep)
        loss = None if labels is None else self.loss(logits, input_ids, labels)
        return ModelOutput(logits, loss, cache, report)

    def route(self, input_ids: torch.Tensor, embedded: Embedded, attention_mask: torch.Tensor | None = None
              ) -> VisorReport:
        """Only the routing phase: the layers up to the router's, then its logits and choices.

        What router training calls (through the family model's ``route``): a step costs the first
        few decoder layers, not the whole model, and gradients reach the router.
        """
        if self.router is None:
            raise ValueError(f"{self.cfg.name} has no router")
        batch = input_ids.shape[0]
        mask = self.checked_mask(attention_mask, input_ids, 0)
        # Parsed without the "untrained router" warning: training the router is what this serves.
        request = LayerRequest.parse(self.plan, "router", batch, True, self.cfg.name)
        executor = self.executor()
        state = executor.start(embedded.embeds, embedded.rotary_positions(mask, 0), mask, embedded.visual_mask,
                               embedded.segments)
        executor.run_layers(state, request.mask(self.plan.num_layers, embedded.embeds.device),
                            range(self.plan.router_layer + 1))
        logits, owners, chosen = self._route(state, self.routing_mask(input_ids), batch)
        return VisorReport(chosen, "router", logits, owners)

    def executor(self, reducers: Sequence[Reducer] = (), plan: LayerPlan | None = None) -> PlanExecutor:
        """The executor of one pass over this decoder and its blocks.

        Args:
            reducers: In-LLM token reduction (FastV, PyramidDrop) to apply during the prefill.
            plan: Another plan over the same weights (``profile`` times the dense plan); default: this one.
        """
        plan = plan or self.plan
        pruning = Pruning(reducers, plan.num_layers) if reducers else None
        return PlanExecutor(self.decoder, plan, self.cross_attention, self.cfg.attn_implementation, pruning,
                            self.observer)

    def _route(self, state, routing_mask, batch):
        """Router logits at each sample's routing tokens, their owners, and the chosen configurations."""
        marks = gather_tokens(routing_mask, state.layout.text_index) & state.layout.text_valid
        rows = marks.nonzero()
        logits = self.router(state.text_states()[rows[:, 0], rows[:, 1]])
        return logits, rows[:, 0], route_configs(self.plan, logits, rows[:, 0], batch)

    # -- requests, masks and positions ------------------------------------------------------------
    def request(self, sa_layers: object, batch: int) -> LayerRequest:
        """``sa_layers`` parsed into a :class:`LayerRequest` (warns once if an untrained router decides)."""
        request = LayerRequest.parse(self.plan, sa_layers, batch, self.router is not None, self.cfg.name)
        if request.routed:
            self.router.warn_if_untrained(self.cfg.name)
        return request

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True on image/video placeholder positions."""
        tokens = self.cfg.tokens
        return (input_ids == tokens.image_token_id) | (input_ids == tokens.video_token_id)

    def routing_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where the router's routing token sits (never, without a router)."""
        if self.router is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.cfg.visor.routing_token_id

    @staticmethod
    def checked_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, past: int) -> torch.Tensor:
        """``attention_mask`` checked (:func:`~visorlib.validation.check_attention_mask`), or all ones when None."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        check_attention_mask(attention_mask, batch, past + length, prefill=past == 0)
        return attention_mask

    def _warn_past_positions(self, position_ids: torch.Tensor, total: int) -> None:
        """Warn once when a position passes ``max_position_embeddings`` (RoPE runs, quality is unknown).

        Positions never exceed the token count, so the reduction runs only when the sequence is
        longer than the limit: ordinary steps pay nothing.
        """
        limit = self.cfg.decoder.max_position_embeddings
        if total <= limit or self._warned_positions:
            return
        largest = int(position_ids.max())
        if largest >= limit:
            self._warned_positions = True
            warnings.warn(
                f"input_ids reach position {largest} but {self.cfg.name} was trained for "
                f"max_position_embeddings={limit} positions; rotary positions run past it, but answers "
                "beyond that length are not reliable",
                UserWarning,
                stacklevel=5,
            )

    # -- head and loss ---------------------------------------------------------------------------
    def supervised_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with the positions this model cannot be trained on set to -100.

        Under a VISOR plan the LM head reads text positions only: a visual token is never a target,
        and the token right after one has no prediction (the visual position's logits are zero).
        """
        if self.plan.dense:
            return labels
        visual = self.visual_token_mask(input_ids)
        after_visual = torch.cat([torch.zeros_like(visual[:, :1]), visual[:, :-1]], dim=1)
        return labels.masked_fill(visual | after_visual, -100)

    def logits(self, hidden: torch.Tensor, visual_mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """LM head over every position (dense plan), or over text positions only (VISOR plans)."""
        if self.plan.dense:
            return self.decoder.logits(hidden[:, -keep:] if keep else hidden)
        if keep:
            return self.decoder.logits(hidden[:, -keep:]) * (~visual_mask[:, -keep:])[..., None]
        index, _ = compact(~visual_mask)
        text_logits = self.decoder.logits(gather_tokens(hidden, index))
        return scatter_tokens(text_logits.new_zeros(*hidden.shape[:2], text_logits.shape[-1]), index, text_logits)

    def supervised_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss, the LM head run only where a target exists.

        Memory is supervised tokens x vocab instead of batch x length x vocab (what training uses).
        """
        targets = self.supervised_labels(input_ids, labels.to(hidden.device))[:, 1:]
        rows = targets != -100
        logits = self.decoder.logits(hidden[:, :-1][rows])
        # Sum / count (not the mean) so a micro-batch without targets gives 0, never NaN.
        return F.cross_entropy(logits.float(), targets[rows], reduction="sum") / rows.sum().clamp_min(1)

    def loss(self, logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of full ``logits`` over labels != -100."""
        labels = self.supervised_labels(input_ids, labels.to(logits.device))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# -- checkpoint names: the parts keep the names they had before this module owned them -----------------


def flat_state_dict_keys(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook of a family model: ``language_model.decoder.*`` is written as ``decoder.*``.

    Renamed in place and in order (parameter order is what an optimizer and a reader see).
    """
    nested = prefix + PREFIX
    items = list(state.items())
    state.clear()
    state.update((prefix + k[len(nested):] if k.startswith(nested) else k, v) for k, v in items)


def nested_state_dict_keys(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load pre-hook of a family model: a checkpoint's ``decoder.*`` (every visorlib checkpoint) is read
    into ``language_model.decoder.*``; keys already nested are left as they are."""
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):].split(".")[0] in PARTS]:
        state[prefix + PREFIX + key[len(prefix):]] = state.pop(key)
