"""VISOR (Vision On Request), read top to bottom.

* :mod:`~visorlib.visor.plan` — each decoder layer's role (text-only, cross-attention,
  self-attention candidate) and the allowed configurations;
* :mod:`~visorlib.visor.request` — ``sa_layers`` parsed once; what ran, reported;
* :mod:`~visorlib.visor.streams` — gather/scatter of the visual and text token streams;
* :mod:`~visorlib.visor.cross_attention` — text reads the visual tokens (with a convolutional
  positional embedding on them);
* :mod:`~visorlib.visor.executor` — runs any plan, per-sample configurations included;
* :mod:`~visorlib.visor.router` — picks a configuration per sample;
* :mod:`~visorlib.visor.token_packing` — VISOR-TR: fewer visual tokens before the decoder;
* :mod:`~visorlib.visor.language_model` — the ``nn.Module`` that owns the decoder and the blocks
  and runs the forward pass after the embeddings (read its ``forward`` first);
* :mod:`~visorlib.visor.visorize` — a dense model becomes a VISOR model.
"""

from .cross_attention import ConvPositionalEmbedding, CrossAttention
from .language_model import Embedded, ModelOutput, VisorLanguageModel
from .plan import CROSS, SELF, TEXT, LayerPlan, validate_sa_layers
from .request import SA_LAYERS_GRAMMAR, LayerRequest, VisorReport, parse_configuration, parse_sa_layers
from .router import ConfigurationRouter, route_configs
from .token_packing import TokenPacker, widen_projector
from .visorize import visorize

__all__ = [
    "CROSS",
    "SELF",
    "TEXT",
    "ConfigurationRouter",
    "ConvPositionalEmbedding",
    "CrossAttention",
    "Embedded",
    "LayerPlan",
    "LayerRequest",
    "ModelOutput",
    "SA_LAYERS_GRAMMAR",
    "TokenPacker",
    "VisorLanguageModel",
    "VisorReport",
    "parse_configuration",
    "parse_sa_layers",
    "route_configs",
    "validate_sa_layers",
    "visorize",
    "widen_projector",
]
