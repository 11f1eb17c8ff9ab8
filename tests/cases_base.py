"""Tiny VISOR models every family's case builds on (tests/cases_*.py).

A 6-layer tiny card of any family with a VISOR plan (CA at 0 and 3, SA candidates 1, 2, 4, a
router before layer 2), and ``build``, which instantiates it with its VISOR parameters random
instead of their identity-like initial values.
"""

from __future__ import annotations

import torch

import visorlib

ROUTING = 252  # the routing token id of the tiny VISOR cards


def tiny_cfg(num_layers: int = 6, card: str = "llava-ov-0.5b", **visor):
    """A 6-layer tiny ``card``: CA at 0 and 3, SA candidates 1, 2, 4, a router before layer 2."""
    spec = dict(ca_layers=[0, 3], sa_layers=[1, 2, 4], configurations=[[1], [1, 2], [1, 4], [1, 2, 4]],
                router=True, router_hidden=16, routing_token_id=ROUTING)
    spec.update(visor)
    cfg = visorlib.get_config(card).tiny().with_overrides({"decoder": {"num_layers": num_layers}})
    return cfg.with_overrides({"visor": spec}) if spec.get("sa_layers") is not None else cfg


def build(cfg, seed: int = 0):
    """``cfg``'s model in eval mode, seeded, its VISOR conv, gate and router weights random."""
    torch.manual_seed(seed)
    model = visorlib.zoo.instantiate(cfg).eval()
    # Random (not zero) conv and gate values, so tests see the blocks actually doing something.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed.conv" in name or name.endswith("gate") or "router" in name:
                param.normal_(std=0.3)
    return model
