"""The VISOR language model: a family's decoder run under a layer plan, with the VISOR blocks.

:class:`VisorLanguageModel` *has* the decoder, the :class:`~visorlib.visor.plan.LayerPlan`, the
cross-attention blocks and the router; a family model *has* one (``model.language_model``). A
forward pass is, top to bottom:

1. parse ``sa_layers`` once into a :class:`~visorlib.visor.request.LayerRequest`;
2. run the decoder layers with the :class:`~visorlib.visor.executor.PlanExecutor`, in two
   explicit phases when the router decides: the layers up to the router's layer (the SA layers
   every configuration shares), then the router reads the text states at the routing tokens and
   picks a configuration per sample, then the remaining layers;
3. the LM head (text positions only under a VISOR plan) and the loss.

The blocks are registered on the family model itself (``model.decoder``, ``model.cross_attention``,
``model.router``), so parameter and state-dict names are those every visorlib checkpoint uses;
this object holds references to them and owns the behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..modules.cache import KVCache
from .cross_attention import CrossAttention
from .executor import PlanExecutor
from .plan import LayerPlan
from .pruning import Pruning
from .reduction import Reducer
from .request import LayerRequest, VisorReport, layer_mask
from .router import ConfigurationRouter, route_configs
from .streams import compact, gather_tokens, scatter_tokens
from .token_packing import TokenPacker, widen_projector


def attach_visor(model: nn.Module) -> None:
    """Give ``model`` (with ``cfg``, ``decoder``, ``projector``) its plan, VISOR blocks and language model.

    For a dense card this is the dense plan and no blocks. The blocks are created untrained;
    :meth:`VisorLanguageModel.init_blocks` initialises them from the dense weights.
    """
    cfg, decoder_cfg = model.cfg.visor, model.cfg.decoder
    model.plan = LayerPlan(decoder_cfg.num_layers, cfg)
    model.cross_attention = model.router = model.packer = None
    if cfg is not None:
        gated = cfg.cross_attention_init == "zero_gate"
        model.cross_attention = nn.ModuleDict(
            {str(i): CrossAttention(decoder_cfg, cfg.conv_kernel, gated) for i in model.plan.ca_layers}
        )
        if cfg.router:
            model.plan.router_layer  # noqa: B018 - raises early if no layer can be skipped
            model.router = ConfigurationRouter(decoder_cfg.hidden_size, cfg.router_hidden,
                                               len(model.plan.configurations))
        if cfg.packing_ratio > 1:
            model.packer = TokenPacker(model.cfg.vision.grid_size, cfg.packing_ratio)
            model.projector.linear_1 = widen_projector(model.projector.linear_1)
    model.language_model = VisorLanguageModel(model.cfg, model.decoder, model.plan, model.cross_attention, model.router)


class VisorLanguageModel:
    """The decoder under a VISOR plan (dense when the card has no ``visor`` section).

    Args:
        cfg: The model's card.
        decoder: The family's decoder (embedding, layers, rotary table, norm, head).
        plan: Layer roles and configurations.
        cross_attention: Cross-attention blocks keyed by layer index, or None.
        router: The configuration router, or None.
    """

    def __init__(self, cfg: ModelConfig, decoder: nn.Module, plan: LayerPlan, cross_attention: nn.ModuleDict | None,
                 router: ConfigurationRouter | None):
        self.cfg, self.decoder, self.plan, self.cross_attention, self.router = cfg, decoder, plan, cross_attention, router
        self.observer = None  # a read-only probe of every prefill (visorlib.analysis sets it for one pass)

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

    # -- requests and masks ----------------------------------------------------------------------
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

    # -- the decoder pass ------------------------------------------------------------------------
    def executor(self, reducers: Sequence[Reducer] = ()) -> PlanExecutor:
        """An executor for one pass; ``reducers``: in-LLM token reduction (FastV, PyramidDrop) to apply."""
        pruning = Pruning(reducers, self.plan.num_layers) if reducers else None
        return PlanExecutor(self.decoder, self.plan, self.cross_attention, self.cfg.attn_implementation, pruning,
                            self.observer)

    def forward(self, embeds, position_ids, attention_mask, visual_mask, segments, routing_mask,
                request: LayerRequest, cache: KVCache | None = None,
                reducers: Sequence[Reducer] = ()) -> tuple[torch.Tensor, VisorReport]:
        """Run the decoder under ``request``; returns ``(hidden [B, L, D], what ran)``.

        A decode step (``cache.seen > 0``) keeps the prefill's configuration: every layer attends
        over what its cache holds, so the request is not consulted again. ``reducers`` (in-LLM token
        reduction) prune visual tokens during the prefill (:mod:`visorlib.visor.pruning`).
        """
        executor = self.executor(reducers)
        state = executor.start(embeds, position_ids, attention_mask, visual_mask, segments, cache)
        table = request.mask(self.plan.num_layers, embeds.device)
        if not request.routed or state.past:
            executor.run_layers(state, table, range(self.plan.num_layers))
            return executor.finish(state), VisorReport([list(c) for c in request.configurations], request.how)
        first = self.plan.router_layer + 1
        executor.run_layers(state, table, range(first))
        logits, owners, chosen = self._route(state, routing_mask, embeds.shape[0])
        executor.run_layers(state, layer_mask(chosen, self.plan.num_layers, embeds.device),
                            range(first, self.plan.num_layers))
        return executor.finish(state), VisorReport(chosen, "router", logits, owners)

    def route(self, embeds, position_ids, attention_mask, visual_mask, segments, routing_mask) -> VisorReport:
        """Only the routing phase: the layers up to the router's, then its logits and choices.

        What router training calls (through the family model's :meth:`route`): a step costs the
        first few decoder layers, not the whole model, and gradients reach the router.
        """
        batch = embeds.shape[0]
        request = LayerRequest.parse(self.plan, "router", batch, self.router is not None, self.cfg.name)
        executor = self.executor()
        state = executor.start(embeds, position_ids, attention_mask, visual_mask, segments)
        executor.run_layers(state, request.mask(self.plan.num_layers, embeds.device), range(self.plan.router_layer + 1))
        logits, owners, chosen = self._route(state, routing_mask, batch)
        return VisorReport(chosen, "router", logits, owners)

    def _route(self, state, routing_mask, batch):
        """Router logits at each sample's routing tokens, their owners, and the chosen configurations."""
        marks = gather_tokens(routing_mask, state.layout.text_index) & state.layout.text_valid
        rows = marks.nonzero()
        logits = self.router(state.text_states()[rows[:, 0], rows[:, 1]])
        return logits, rows[:, 0], route_configs(self.plan, logits, rows[:, 0], batch)

    # -- head and loss ---------------------------------------------------------------------------
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
