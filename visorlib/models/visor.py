"""VISOR on top of a dense vision-language model: blocks, configurations, routing, visorize.

:class:`VisorMixin` is shared by every model family. It owns the layer plan, the cross-attention
blocks, the router and the token packer, turns a user's ``sa_layers`` into a per-sample
configuration, and drives :class:`~visorlib.models.executor.PlanExecutor`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from ..blocks import (
    ConfigurationRouter,
    CrossAttention,
    LayerPlan,
    TokenPacker,
    route_configs,
    validate_sa_layers,
    widen_projector,
)
from ..config import ConfigError, ModelConfig, VisorConfig
from .executor import PlanExecutor, gather_tokens


class VisorMixin:
    """Adds the VISOR plan to a model with ``cfg``, ``decoder`` and ``projector``."""

    cfg: ModelConfig

    def _init_visor(self) -> None:
        """Create the plan and (for VISOR cards) the new blocks; called from ``__init__``."""
        cfg, decoder_cfg = self.cfg.visor, self.cfg.decoder
        self.plan = LayerPlan(decoder_cfg.num_layers, cfg)
        self.cross_attention = None
        self.router = None
        self.packer = None
        if cfg is None:
            return
        gated = cfg.cross_attention_init == "zero_gate"
        self.cross_attention = nn.ModuleDict(
            {str(i): CrossAttention(decoder_cfg, cfg.conv_kernel, gated) for i in self.plan.ca_layers}
        )
        if cfg.router:
            self.plan.router_layer  # noqa: B018 - raises early if no layer can be skipped
            self.router = ConfigurationRouter(decoder_cfg.hidden_size, cfg.router_hidden, len(self.plan.configurations))
        if cfg.packing_ratio > 1:
            self.packer = TokenPacker(self.cfg.vision.grid_size, cfg.packing_ratio)
            self.projector.linear_1 = widen_projector(self.projector.linear_1)

    @torch.no_grad()
    def init_visor_blocks(self) -> None:
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

    # -- configurations ---------------------------------------------------------------------------
    def resolve_configurations(self, sa_layers: Any, batch: int) -> list[list[int]] | None:
        """Per-sample configurations for ``sa_layers``; None means "ask the router".

        Accepts None (the card's default), ``"all"``, ``"router"``, one list of layers for the whole
        batch, or one list per sample; checked by :func:`~visorlib.blocks.plan.validate_sa_layers`.
        Routing with a router that was never trained warns once (see
        :meth:`~visorlib.blocks.router.ConfigurationRouter.warn_if_untrained`).
        """
        configs = validate_sa_layers(self.plan, sa_layers, batch, self.router is not None, self.cfg.name)
        if configs is None:
            self.router.warn_if_untrained(self.cfg.name)
        return configs

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True on image/video placeholder positions."""
        tokens = self.cfg.tokens
        return (input_ids == tokens.image_token_id) | (input_ids == tokens.video_token_id)

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

    def _executes(self, configs: list[list[int]], device) -> torch.Tensor:
        table = torch.zeros(len(configs), self.plan.num_layers, dtype=torch.bool, device=device)
        for row, config in enumerate(configs):
            table[row, config] = True
        return table

    def run_decoder(self, embeds, position_ids, attention_mask, visual_mask, segments, routing_mask, sa_layers,
                    cache=None, stop_after=None):
        """Run the decoder under the plan; returns ``(hidden, configs, router_logits)``."""
        batch = embeds.shape[0]
        past = cache.seen if cache is not None else 0
        configs = self.resolve_configurations(None if past else sa_layers, batch)
        routed: dict[str, Any] = {}
        hook = None
        if configs is None:
            configs = [self.plan.always_executed] * batch

            def hook(index, state):
                if index != self.plan.router_layer:
                    return None
                text = state.text_states()
                marks = gather_tokens(routing_mask[:, past:], state.layout.text_index) & state.layout.text_valid
                rows = marks.nonzero()
                logits = self.router(text[rows[:, 0], rows[:, 1]])
                chosen = route_configs(self.plan, logits, rows[:, 0], batch)
                routed.update(configs=chosen, logits=logits)
                return self._executes(chosen, embeds.device)

        executor = PlanExecutor(self.decoder, self.plan, self.cross_attention, self.cfg.attn_implementation)
        hidden = executor.run(embeds, position_ids, attention_mask, visual_mask, segments,
                              self._executes(configs, embeds.device), cache, hook, stop_after)
        return hidden, routed.get("configs", configs), routed.get("logits")


def visorize(model: nn.Module, visor: VisorConfig | dict | str, warn: bool = True) -> nn.Module:
    """Turn a dense model into a VISOR model (in place) and return it.

    The new blocks are initialised from the dense weights (cross-attention copied from each CA
    layer's self-attention, or random behind a zero gate); they are untrained until fine-tuned.

    Args:
        model: A dense visorlib model (``model.cfg.visor is None``).
        visor: A :class:`~visorlib.config.VisorConfig`, a card's ``visor`` mapping, or the name of a
            VISOR zoo card whose plan to use (``"visor-llava-ov-0.5b"``).
        warn: Emit the "untrained blocks" warning.
    """
    if model.cfg.visor is not None:
        raise ConfigError(f"{model.cfg.name} already has a VISOR plan")
    if isinstance(visor, str):
        from ..zoo import get_config

        card = get_config(visor)
        if card.visor is None:
            raise ConfigError(f"zoo card {visor!r} has no visor section")
        visor = card.visor
    if isinstance(visor, dict):
        visor = ModelConfig.from_dict({"visor": visor}, "visorize()").visor
    LayerPlan(model.cfg.decoder.num_layers, visor)  # validate before touching the model
    device = next(model.parameters()).device
    model.cfg = copy.deepcopy(model.cfg)
    model.cfg.visor = visor
    model._init_visor()
    model.to(device)
    model.init_visor_blocks()
    if warn:
        warnings.warn(
            f"{model.cfg.name}: the VISOR blocks (cross-attention, router, packing projector) are freshly "
            "initialised and untrained; fine-tune before trusting its answers",
            stacklevel=2,
        )
    return model
