"""The SigLIP tower class: timm's ``VisionTransformer`` configured as SigLIP.

Kept apart from :mod:`.siglip` (key map, FLOPs, registration) because defining the class imports
timm, which takes seconds; :mod:`.siglip` imports this module only when a tower is built.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...config import VisionConfig


class SiglipVisionTower(VisionTransformer):
    """timm ViT configured as SigLIP; ``forward`` returns per-patch features ``[N, T, C]``.

    The final ``norm`` (Hugging Face's ``post_layernorm``) is kept so checkpoints round-trip and
    parameter counts match the reference, but LLaVA-OneVision's features are taken before it.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.hidden_size,
            depth=cfg.num_layers,
            num_heads=cfg.num_heads,
            # timm sizes the MLP as int(dim * mlp_ratio); the +0.5 makes the floor land exactly on
            # intermediate_size whatever the float rounding of the ratio.
            mlp_ratio=(cfg.intermediate_size + 0.5) / cfg.hidden_size,
            qkv_bias=True,
            class_token=False,
            global_pool="",
            num_classes=0,
            act_layer=cfg.hidden_act,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        )
        self.cfg = cfg
        # Unused by LLaVA-OneVision (features are read before it): frozen so optimisers skip it.
        self.norm.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Patch features of the last block, before the final norm.

        Args:
            pixel_values: ``[N, 3, image_size, image_size]`` normalised tiles.

        Returns:
            ``[N, grid_size**2, hidden_size]``.
        """
        x = self.patch_embed(pixel_values)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return x
