"""The SigLIP tower class: timm's ``VisionTransformer`` configured as SigLIP.

Kept apart from :mod:`.siglip` (key map, FLOPs, registration) because defining the class imports
timm, which takes seconds; :mod:`.siglip` imports this module only when a tower is built.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...config import ConfigError, VisionConfig

# timm's names for the tower's MLP activation (``VisionConfig.hidden_act``) -> F.gelu's ``approximate``.
GELU_APPROXIMATION = {"gelu_tanh": "tanh", "gelu": "none"}


class InferenceInPlaceGELU(nn.GELU):
    """``nn.GELU`` that writes into its input when autograd records nothing (inference, a frozen tower).

    Why: in the MLP the first projection's output is dead once activated, and it is the largest
    buffer of the tower (``[tiles * 729, 4304]``, 25 MB for two 384-px tiles). A second buffer of
    that size per block was the one glibc's heap kept returning to the system and faulting back in:
    profiled against transformers' SigLIP on the same weights, the MLP's GELU and bias copy took
    2.2x and 10x as long as transformers' identical ops (``benchmarks/README.md``, "Whole prefill
    vs transformers"). Same kernel, same values; with autograd on it is plain ``nn.GELU``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class SiglipVisionTower(VisionTransformer):
    """timm ViT configured as SigLIP; ``forward`` returns per-patch features ``[N, T, C]``.

    The final ``norm`` (Hugging Face's ``post_layernorm``) is kept so checkpoints round-trip and
    parameter counts match the reference, but LLaVA-OneVision's features are taken before it.
    """

    def __init__(self, cfg: VisionConfig):
        if cfg.hidden_act not in GELU_APPROXIMATION:
            raise ConfigError(f"vision.hidden_act {cfg.hidden_act!r} is not supported by the SigLIP tower "
                              f"(one of {sorted(GELU_APPROXIMATION)})")
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
            act_layer=partial(InferenceInPlaceGELU, approximate=GELU_APPROXIMATION[cfg.hidden_act]),
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
