"""Other SigLIP sizes plug in by timm name: ``vision.timm_model`` fills in the tower.

A LLaVA-OneVision card whose vision section is only ``{kind: siglip, timm_model:
vit_base_patch16_siglip_384}`` must build, train (forward + backward) and produce exactly what
timm's own model computes with the same weights (its ``forward_features`` before the final norm).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import visorlib
from visorlib.config import ConfigError, ModelConfig, VisionConfig
from visorlib.models.llava_onevision import LlavaOnevisionProcessor
from visorlib.registry import resolve, resolve_vision

ARCH = "vit_base_patch16_siglip_384"


def plugin_config() -> ModelConfig:
    """The tiny LLaVA-OV card with its vision section replaced, as a user's card would write it."""
    card = visorlib.get_config("llava-ov-0.5b").tiny().to_dict()
    card["vision"] = {"kind": "siglip", "timm_model": ARCH}
    card["processing"]["aspect_mode"] = "pad"  # one 384-px tile per image keeps the test quick
    # Parsing is pure data; the build step (registry.resolve, which build/instantiate call) derives
    # the tower fields from timm.
    return resolve(ModelConfig.from_dict(card, "plugin card"))


def test_fields_come_from_timm():
    vision = plugin_config().vision
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.intermediate_size) == (384, 16, 768, 3072)
    assert (vision.num_layers, vision.num_heads, vision.hidden_act) == (12, 12, "gelu")  # timm's SigLIPs: exact GELU
    # The explicit-fields path is untouched: defaults are SigLIP-so400m with tanh GELU.
    assert VisionConfig().hidden_act == "gelu_tanh" and VisionConfig().timm_model is None
    with pytest.raises(ConfigError, match="contradicts timm architecture"):
        resolve_vision(VisionConfig(timm_model=ARCH, hidden_size=1000))
    with pytest.raises(ConfigError, match="not a SigLIP-style ViT.*cls_token"):
        resolve_vision(VisionConfig(timm_model="vit_base_patch16_224"))


def test_plugged_tower_trains_and_equals_timm():
    import timm

    cfg = plugin_config()
    torch.manual_seed(0)
    model = visorlib.zoo.instantiate(cfg).train()
    noise = Image.fromarray(torch.randint(0, 256, (300, 200, 3), dtype=torch.uint8).numpy())
    ids, vision, tiles = LlavaOnevisionProcessor(cfg).profile_inputs(noise, n_text=6)
    assert tiles == 1 and int((ids == cfg.tokens.image_token_id).sum()) == 24 * 24 + 1  # 576 patches + newline
    captured = {}
    model.vision_tower.register_forward_hook(lambda module, args, out: captured.update(pixels=args[0], out=out))
    out = model(ids, **vision, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("vision_tower.") and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0

    with torch.device("meta"):  # timm's own network, shapes only: the weights are ours (assign=True)
        reference = timm.create_model(ARCH, pretrained=False).eval()
    missing, unexpected = reference.load_state_dict(model.vision_tower.state_dict(), strict=False, assign=True)
    assert not unexpected and all(k.startswith("attn_pool.") for k in missing)  # only timm's pooling head
    reference.norm = torch.nn.Identity()  # LLaVA-OneVision reads the features before the final norm
    with torch.no_grad():
        expected = reference.forward_features(captured["pixels"])
    torch.testing.assert_close(captured["out"].detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden_act", ["gelu_tanh", "gelu"])
def test_the_tower_gelu_writes_in_place_only_when_autograd_records_nothing(hidden_act):
    """Inference reuses the first projection's buffer; with autograd on it is plain nn.GELU (same values and grads)."""
    from visorlib.models.llava_onevision.siglip_vit import GELU_APPROXIMATION, InferenceInPlaceGELU

    act = InferenceInPlaceGELU(approximate=GELU_APPROXIMATION[hidden_act])
    reference = torch.nn.GELU(approximate=GELU_APPROXIMATION[hidden_act])
    x = torch.randn(4, 7)
    expected = reference(x)
    with torch.inference_mode():
        buffer = x.clone()
        out = act(buffer)
        assert out.data_ptr() == buffer.data_ptr() and torch.equal(out, expected)
    leaf = x.clone().requires_grad_()
    out = act(leaf)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf, x)  # the input is left alone
    out.sum().backward()
    leaf_ref = x.clone().requires_grad_()
    reference(leaf_ref).sum().backward()
    assert torch.equal(out.detach(), expected) and torch.equal(leaf.grad, leaf_ref.grad)


def test_a_tower_activation_other_than_gelu_is_refused_naming_the_key():
    from visorlib.models.llava_onevision.siglip_vit import SiglipVisionTower

    cfg = VisionConfig(image_size=28, patch_size=14, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                       hidden_act="quick_gelu")
    with pytest.raises(ConfigError, match=r"vision.hidden_act 'quick_gelu' is not supported by the SigLIP tower"):
        SiglipVisionTower(cfg)
