"""SigLIP vision tower, built from timm's ViT.

Reference: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (https://arxiv.org/abs/2303.15343).
LLaVA-OneVision uses SigLIP-so400m/14 at 384 px with its last block removed (26 of 27) and reads
the output of the last kept block *before* ``post_layernorm``. timm's ``VisionTransformer`` is the
same network; two details must be set for numerical parity with Hugging Face: tanh-approximated
GELU and LayerNorm eps 1e-6. timm ships no converter from Hugging Face's SigLIP keys, so
:func:`siglip_key_map` is ours.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import VisionConfig


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
            act_layer="gelu_tanh",
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


_SIGLIP_RENAMES = [
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"post_layernorm\.", "norm."),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def siglip_key_map(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face ``SiglipVisionTransformer`` state dict to :class:`SiglipVisionTower` keys.

    Keys are relative to the vision transformer (``embeddings.*``, ``encoder.*``, ``post_layernorm.*``).
    q/k/v projections are concatenated into timm's fused ``qkv``; the position table gains a
    leading batch axis. The pooling head (``head.*``), unused by LLaVA-OneVision, is dropped by
    :func:`visorlib.convert.convert_llava_onevision_state` before this map runs.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        match = _QKV.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        new = key
        for pattern, repl in _SIGLIP_RENAMES:
            new = re.sub(pattern, repl, new)
        if new == "pos_embed":
            value = value.unsqueeze(0)
        out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise KeyError(f"SigLIP layer {layer}: missing {', '.join(m + '_proj.' + kind for m in missing)}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
