"""``visorize``: turn a dense model into a VISOR model, in place.

The dense model's decoder stays as it is; the plan changes the role of its layers, and the new
blocks (cross-attention at the CA layers, the router, the packing projector) are added beside it
and initialised from the dense weights.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from ..config import ConfigError, ModelConfig, VisorConfig
from ..registry import resolve
from .plan import LayerPlan


def visorize(model: nn.Module, visor: VisorConfig | dict, warn: bool = True) -> nn.Module:
    """Turn a dense model into a VISOR model (in place) and return it.

    The new blocks are initialised from the dense weights (cross-attention copied from each CA
    layer's self-attention, or random behind a zero gate); they are untrained until fine-tuned.

    Args:
        model: A dense visorlib model (``model.cfg.visor is None``).
        visor: A :class:`~visorlib.config.VisorConfig` or a card's ``visor`` mapping. The name of a
            VISOR zoo card (``"visor-llava-ov-0.5b"``) is accepted by :func:`visorlib.visorize`.
        warn: Emit the "untrained blocks" warning.
    """
    if model.cfg.visor is not None:
        raise ConfigError(f"{model.cfg.name} already has a VISOR plan")
    if isinstance(visor, dict):
        visor = ModelConfig.from_dict({"visor": visor}, "visorize()").visor
    if not isinstance(visor, VisorConfig):
        raise ConfigError(f"visorize() needs a VisorConfig, a card's visor mapping or a VISOR card name, got {visor!r}")
    LayerPlan(model.cfg.decoder.num_layers, visor)  # validate before touching the model
    cfg = copy.deepcopy(model.cfg)
    cfg.visor = visor
    model.cfg = resolve(cfg)  # the family must support the plan (e.g. token packing)
    device = next(model.parameters()).device
    # The family builds its language model again around the dense decoder it already has (the
    # same step as at construction, which also widens the projector under token packing).
    model._finish_init(model.decoder)
    model.to(device)
    model.language_model.init_blocks()
    if warn:
        warnings.warn(
            f"{model.cfg.name}: the VISOR blocks (cross-attention, router, packing projector) are freshly "
            "initialised and untrained; fine-tune before trusting its answers",
            stacklevel=2,
        )
    return model
