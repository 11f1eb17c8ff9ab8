"""SigLIP vision tower, built from timm's ViT.

Reference: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (https://arxiv.org/abs/2303.15343).
LLaVA-OneVision uses SigLIP-so400m/14 at 384 px with its last block removed (26 of 27) and reads
the output of the last kept block *before* ``post_layernorm``. timm's ``VisionTransformer`` is the
same network; two details must be set for numerical parity with Hugging Face: tanh-approximated
GELU and LayerNorm eps 1e-6. timm ships no converter from Hugging Face's SigLIP keys, so
:func:`siglip_key_map` is ours.

Other SigLIP sizes plug in by name: a card with ``vision.timm_model: vit_base_patch16_siglip_384``
gets its sizes from timm's own architecture (:func:`siglip_fields_from_timm`), so the tower is that
network with the same parameter names as timm's (its ``state_dict`` loads into timm's model).

The tower class itself lives in :mod:`.siglip_vit`, which imports timm: importing timm costs
seconds (it pulls in torchvision and, where installed, wandb), so it happens only when a tower is
built or a timm architecture is read, not on ``import visorlib`` (issue 17's start-up target).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...config import ConfigError, VisionConfig
from ...modules.convert import rename_keys
from ...modules.counting import attention_core_flops, linear_flops
from ...registry import register_vision_tower


def siglip_fields_from_timm(timm_model: str, timm_kwargs: dict) -> dict:
    """The :class:`VisionConfig` fields of a timm SigLIP-style ViT (``vit_base_patch16_siglip_384``...).

    The architecture is built on the meta device (free) and read back; the tower those fields
    describe is then checked to have exactly timm's parameters (names and shapes, the pooling
    head aside), so an architecture this adapter cannot express (a class token, layer scale,
    q/k norms...) is refused instead of silently built differently.

    Raises:
        ConfigError: Unknown architecture, not a ViT, or not expressible as a SigLIP tower.
    """
    import timm
    from timm.layers import GELUTanh
    from timm.models.vision_transformer import VisionTransformer

    from .siglip_vit import SiglipVisionTower

    try:
        with torch.device("meta"):
            vit = timm.create_model(timm_model, pretrained=False, **timm_kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # unknown name or bad keyword argument
        raise ConfigError(f"vision.timm_model {timm_model!r} with timm_kwargs {timm_kwargs}: {err}") from err
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"vision.timm_model {timm_model!r} is a {type(vit).__name__}, not a timm VisionTransformer")
    img, patch = vit.patch_embed.img_size, vit.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        raise ConfigError(f"vision.timm_model {timm_model!r}: only square images and patches are supported")
    block = vit.blocks[0]
    act = block.mlp.act
    if isinstance(act, GELUTanh) or getattr(act, "approximate", None) == "tanh":
        hidden_act = "gelu_tanh"
    elif isinstance(act, nn.GELU):
        hidden_act = "gelu"
    else:
        raise ConfigError(f"vision.timm_model {timm_model!r}: MLP activation {type(act).__name__} is not supported")
    fields = dict(image_size=img[0], patch_size=patch[0], hidden_size=vit.embed_dim,
                  intermediate_size=block.mlp.fc1.out_features, num_layers=len(vit.blocks),
                  num_heads=block.attn.num_heads, layer_norm_eps=block.norm1.eps, hidden_act=hidden_act)
    with torch.device("meta"):
        tower = SiglipVisionTower(VisionConfig(kind="siglip", **fields))
    ours = {k: v.shape for k, v in tower.state_dict().items()}
    # The attention-pooling head (global_pool='map') is unused: features are per patch.
    theirs = {k: v.shape for k, v in vit.state_dict().items() if not k.startswith(("attn_pool.", "head.", "fc_norm."))}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
        raise ConfigError(
            f"vision.timm_model {timm_model!r} is not a SigLIP-style ViT the siglip tower can express "
            f"(parameters differ at {differ[:4]})"
        )
    return fields


# Hugging Face SiglipVisionTransformer -> timm VisionTransformer, keys relative to the transformer.
# q/k/v are not here: they are fused into timm's qkv (see siglip_key_map).
_SIGLIP_RENAMES = [
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def siglip_key_map(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face ``SiglipVisionTransformer`` state dict to :class:`SiglipVisionTower` keys.

    Keys are relative to the vision transformer (``embeddings.*``, ``encoder.*``, ``post_layernorm.*``).
    q/k/v projections are concatenated into timm's fused ``qkv``; the position table gains a
    leading batch axis. The pooling head (``head.*``), unused by LLaVA-OneVision, is dropped by
    :func:`visorlib.models.llava_onevision.convert.convert_llava_onevision_state` before this map runs.

    Raises:
        CheckpointError: for keys a SigLIP vision transformer does not have.
        KeyError: when a layer lacks one of its q/k/v projections.
    """
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        match = _QKV.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
        else:
            rest[key] = value
    out = rename_keys(rest, _SIGLIP_RENAMES, source="SigLIP vision tower")
    if "pos_embed" in out:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise KeyError(f"SigLIP layer {layer}: missing {', '.join(m + '_proj.' + kind for m in missing)}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


@register_vision_tower("siglip", timm_fields=siglip_fields_from_timm)
def build_siglip(cfg: VisionConfig) -> nn.Module:
    """The ``vision.kind: siglip`` tower."""
    from .siglip_vit import SiglipVisionTower

    return SiglipVisionTower(cfg)


def siglip_tower_flops(cfg: VisionConfig, tiles: int) -> float:
    """The ViT over ``tiles`` tiles: patch embedding, then ``num_layers`` pre-norm blocks."""
    tokens = cfg.tokens_per_tile
    per_tile = linear_flops(tokens, 3 * cfg.patch_size**2, cfg.hidden_size)
    block = (
        linear_flops(tokens, cfg.hidden_size, 3 * cfg.hidden_size)
        + attention_core_flops(tokens, tokens, cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        + linear_flops(tokens, cfg.hidden_size, cfg.hidden_size)
        + 2 * linear_flops(tokens, cfg.hidden_size, cfg.intermediate_size)
    )
    return tiles * (per_tile + cfg.num_layers * block)


def __getattr__(name: str):
    """``SiglipVisionTower`` on first use (importing it imports timm; see the module docstring)."""
    if name == "SiglipVisionTower":
        from .siglip_vit import SiglipVisionTower

        return SiglipVisionTower
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
