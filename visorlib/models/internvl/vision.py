"""InternViT and InternVL's pixel shuffle, in pure PyTorch (``vision.kind: internvit``).

Reference: Chen et al., "InternVL: Scaling up Vision Foundation Models and Aligning for Generic
Visual-Linguistic Tasks" (https://arxiv.org/abs/2312.14238) and the InternVL3 report
(https://arxiv.org/abs/2504.10479). InternViT-300M is a plain pre-norm ViT with a class token,
learned absolute positions, separate ``q/k/v`` projections with biases, exact GELU and
per-channel *layer scales* (``lambda_1``, ``lambda_2``) on both residual branches. Its own tower
here (not timm's ``vit_intern300m_patch14_448``), so the parameter names are transformers'
(``InternVLVisionModel``) and the checkpoint key map stays a prefix table.

InternVL reads the last block's output, drops the class token and folds every 2x2 patches into
one token of 4x the width (**pixel shuffle**, ratio 0.5): a 448-px tile of 32x32 patches becomes
16x16 = 256 tokens of width 4096. The tower's contract is the tiled families' one
(``docs/adding-a-backbone.md``): ``[N, 3, S, S]`` tiles -> ``[N, (S / patch_size)**2, hidden_size]``,
row-major over a square grid, where, as that contract asks of a tower that downsamples,
``vision.patch_size`` (28) and ``vision.hidden_size`` (4096) are the *effective* patch and width
after the shuffle; the ViT itself runs at ``patch_size * downsample_ratio`` (14 px) and
``hidden_size * downsample_ratio**2`` (1024) wide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, VisionConfig
from ...modules.counting import attention_core_flops, linear_flops
from ...modules.layers import RMSNorm, attend
from ...registry import register_vision_tower


def vit_geometry(cfg: VisionConfig) -> tuple[int, int, int]:
    """``(patch, width, fold)`` of the ViT itself: its patch side, its width and the shuffle's fold (2)."""
    fold = round(1 / cfg.downsample_ratio)
    if fold * cfg.downsample_ratio != 1 or cfg.patch_size % fold or cfg.hidden_size % (fold * fold):
        raise ConfigError(f"internvit: downsample_ratio {cfg.downsample_ratio} must be 1/k with patch_size "
                          f"{cfg.patch_size} divisible by k and hidden_size {cfg.hidden_size} by k*k")
    return cfg.patch_size // fold, cfg.hidden_size // (fold * fold), fold


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[N, g, g, C]`` -> ``[N, g*ratio, g*ratio, C/ratio**2]``, element for element transformers' ``pixel_shuffle``.

    Two reshapes with transposes between them, as the reference writes it (the channel order of
    a folded token is what the projector was trained on, so it must be reproduced exactly).
    """
    n, rows, cols, channels = x.shape
    if (rows * ratio) % 1 or (cols * ratio) % 1:
        raise ValueError(f"pixel shuffle: a {rows}x{cols} grid cannot be scaled by {ratio}")
    x = x.reshape(n, rows, int(cols * ratio), int(channels / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(cols * ratio), int(rows * ratio), int(channels / ratio**2))
    return x.permute(0, 2, 1, 3)


class InternAttention(nn.Module):
    """Multi-head self-attention with separate biased ``q/k/v`` and an optional RMSNorm on q and k."""

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.q_norm = RMSNorm(width) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width) if qk_norm else nn.Identity()
        self.projection_layer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, implementation: str) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)
        q, k, v = (t.view(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attend(q, k, v, None, implementation)
        return self.projection_layer(out.transpose(1, 2).reshape(n, length, width))


class InternMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with exact GELU."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternBlock(nn.Module):
    """``x + lambda_1 * attn(ln(x))``, then ``x + lambda_2 * mlp(ln(x))``."""

    def __init__(self, cfg: VisionConfig, width: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.attention = InternAttention(width, cfg.num_heads, cfg.use_qk_norm)
        self.lambda_1 = nn.Parameter(torch.ones(width))
        self.layernorm_after = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.mlp = InternMLP(width, cfg.intermediate_size)
        self.lambda_2 = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor, implementation: str) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x), implementation)
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternViTTower(nn.Module):
    """InternViT plus the pixel shuffle: ``[N, 3, S, S]`` tiles -> ``[N, (S / patch_size)**2, hidden_size]``.

    Args:
        cfg: Tower hyper-parameters (``kind: internvit``; effective ``patch_size`` and
            ``hidden_size``, see the module docstring).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        patch, width, _ = vit_geometry(cfg)
        if cfg.hidden_act != "gelu":
            raise ConfigError(f"vision.hidden_act {cfg.hidden_act!r} is not supported by internvit (it uses 'gelu')")
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"internvit: image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        grid = cfg.image_size // patch
        self.patch_embed = nn.Conv2d(cfg.in_channels, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList(InternBlock(cfg, width) for _ in range(cfg.num_layers))

    def reset_tower_parameters(self) -> None:
        """Layer scales at ``layer_scale_init`` (InternViT's 0.1), a random class token (a built-from-scratch tower)."""
        with torch.no_grad():
            nn.init.normal_(self.cls_token, std=0.02)
            for block in self.blocks:
                block.lambda_1.fill_(self.cfg.layer_scale_init or 1.0)
                block.lambda_2.fill_(self.cfg.layer_scale_init or 1.0)

    def forward(self, pixel_values: torch.Tensor, implementation: str = "sdpa") -> torch.Tensor:
        """Visual tokens ``[N, (S / patch_size)**2, hidden_size]`` of ``[N, 3, S, S]`` normalised tiles."""
        side = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.cfg.in_channels, side, side):
            raise ValueError(f"internvit tiles must be [N, {self.cfg.in_channels}, {side}, {side}], "
                             f"got {list(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, implementation)
        patches = x[:, 1:]  # the class token is dropped (vision_feature_select_strategy "default")
        grid = int(patches.shape[1] ** 0.5)
        folded = pixel_shuffle(patches.reshape(len(x), grid, grid, -1), self.cfg.downsample_ratio)
        return folded.reshape(len(x), -1, folded.shape[-1])


@register_vision_tower("internvit")
def build_internvit(cfg: VisionConfig) -> nn.Module:
    """The ``vision.kind: internvit`` tower."""
    return InternViTTower(cfg)


def internvit_tower_flops(cfg: VisionConfig, tiles: int) -> float:
    """``tiles`` tiles through InternViT (class token included; the shuffle is a reshape)."""
    patch, width, _ = vit_geometry(cfg)
    patches = (cfg.image_size // patch) ** 2
    tokens = patches + 1
    embed = linear_flops(patches, cfg.in_channels * patch * patch, width)
    block = (linear_flops(tokens, width, 4 * width) + 2 * linear_flops(tokens, width, cfg.intermediate_size)
             + attention_core_flops(tokens, tokens, cfg.num_heads, width // cfg.num_heads))
    return tiles * (embed + cfg.num_layers * block)
