"""Backbone-agnostic VISOR blocks: layer plan, cross-attention, router, token packing."""

from .cross_attention import ConvPositionalEmbedding, CrossAttention
from .plan import CROSS, SELF, TEXT, LayerPlan, validate_sa_layers
from .router import ConfigurationRouter, costliest, route_configs
from .token_packing import TokenPacker, widen_projector

__all__ = [
    "CROSS",
    "SELF",
    "TEXT",
    "ConfigurationRouter",
    "ConvPositionalEmbedding",
    "CrossAttention",
    "LayerPlan",
    "TokenPacker",
    "costliest",
    "route_configs",
    "validate_sa_layers",
    "widen_projector",
]
