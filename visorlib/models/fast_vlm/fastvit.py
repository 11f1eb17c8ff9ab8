"""FastViT vision tower (FastVLM's FastViTHD), built by timm.

Reference: Vasu et al., "FastVLM: Efficient Vision Encoding for Vision Language Models"
(https://arxiv.org/abs/2412.13303). FastViTHD *is* timm's ``fastvit_mci3``: a hybrid network of
five stages (RepMixer convolutions in the first three, self-attention with a re-parameterised
convolutional position encoding in the last two) that downsamples 64x, followed by a 3x3
``final_conv`` (MobileOne block with squeeze-excite) widening 1536 -> 3072 channels. FastVLM reads
that 3072-channel map, flattened row-major: 16 x 16 = 256 tokens at 1024 px, 36 at 384 px.

FastVLM ships the network *re-parameterised* (``inference_mode=True``: each multi-branch block
folded into one convolution), so that is how the tower is built; the parameter names are timm's,
under ``timm_model.``, exactly as in transformers' ``TimmWrapperModel``. Nothing here re-implements
FastViT: timm is the implementation, this module only fixes how it is created and read. timm is
imported when a tower is created, not with this module: it costs seconds of ``import visorlib``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import ConfigError, VisionConfig
from ...modules.counting import counted_tower_flops
from ...registry import register_vision_tower


def create_fastvit(timm_model: str, timm_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` for a re-parameterised FastViT without a classifier.

    Args:
        timm_model: A timm FastViT architecture (``"fastvit_mci3"`` for FastViTHD).
        timm_kwargs: Extra constructor arguments (for tests: ``layers``, ``embed_dims``).

    Raises:
        ConfigError: Unknown architecture, a bad keyword argument, or not a FastViT.
    """
    import timm
    from timm.models.fastvit import FastVit

    if "inference_mode" in timm_kwargs and not timm_kwargs["inference_mode"]:
        raise ConfigError("vision.timm_kwargs: FastVLM checkpoints are re-parameterised; inference_mode must be true")
    kwargs = {k: v for k, v in timm_kwargs.items() if k != "inference_mode"}
    try:
        model = timm.create_model(timm_model, pretrained=False, num_classes=0, inference_mode=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # unknown name or bad keyword argument
        raise ConfigError(f"vision.timm_model {timm_model!r} with timm_kwargs {timm_kwargs}: {err}") from err
    if not isinstance(model, FastVit) or model.fork_feat:
        raise ConfigError(f"vision.timm_model {timm_model!r} is not a timm FastViT classifier network")
    return model


def fastvit_fields_from_timm(timm_model: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The :class:`VisionConfig` fields a FastViT architecture determines.

    ``hidden_size`` is the width after ``final_conv``, ``patch_size`` the total downsampling (one
    visual token covers a ``patch_size``-pixel square) and ``num_layers`` the number of blocks.
    """
    with torch.device("meta"):
        model = create_fastvit(timm_model, timm_kwargs)
    return {
        "hidden_size": model.num_features,
        "patch_size": model.feature_info[-1]["reduction"],
        "num_layers": sum(len(stage.blocks) for stage in model.stages),
    }


class FastVitTower(nn.Module):
    """A timm FastViT; ``forward`` returns the ``final_conv`` map as tokens ``[N, (S/64)**2, C]``.

    Args:
        cfg: ``kind: fastvit`` with ``timm_model`` (and optionally ``timm_kwargs``) set; the input
            side ``image_size`` must be a multiple of ``patch_size``.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.timm_model is None:
            raise ConfigError("vision kind 'fastvit' needs vision.timm_model (FastVLM: fastvit_mci3)")
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(
                f"vision.image_size {cfg.image_size} must be a multiple of the FastViT's downsampling {cfg.patch_size}"
            )
        self.cfg = cfg
        # The attribute name matches transformers' TimmWrapperModel, so FastVLM keys map by prefix.
        self.timm_model = create_fastvit(cfg.timm_model, cfg.timm_kwargs)

    @torch.no_grad()
    def reset_tower_parameters(self) -> None:
        """Random init that keeps activations alive through the convolution stack.

        Convolutions get He (fan-in) scaling, linears timm's truncated normal(0.02), norms unit
        scale and fresh statistics, layer scales timm's 1e-5 (blocks start near identity).
        Called by :func:`visorlib.models.init_weights`; real use loads a checkpoint instead.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                module.reset_parameters()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith(".gamma"):  # timm's LayerScale2d
                nn.init.constant_(param, 1e-5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens of each tile.

        Args:
            pixel_values: ``[N, 3, image_size, image_size]`` normalised images.

        Returns:
            ``[N, (image_size // patch_size) ** 2, hidden_size]``, row-major over the feature map.
        """
        features = self.timm_model.forward_features(pixel_values)
        # Contiguous, as every other tower returns: a transposed view sends the projector's GEMM down a
        # path whose bits depend on the operands' addresses, so two identical models disagreed in the
        # last bit and a gathered copy (pre-LLM reduction) differed from the unreduced path.
        return features.flatten(2).transpose(1, 2).contiguous()


@register_vision_tower("fastvit", timm_fields=fastvit_fields_from_timm)
def build_fastvit(cfg: VisionConfig) -> nn.Module:
    """The ``vision.kind: fastvit`` tower."""
    return FastVitTower(cfg)


def fastvit_tower_flops(cfg: VisionConfig, tiles: int) -> float:
    """``tiles`` tiles through FastViT, counted once per configuration on the meta device."""
    return tiles * counted_tower_flops(cfg) if tiles else 0.0
