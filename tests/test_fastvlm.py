"""FastVLM specifics next to the shared parity suite (tests/test_parity.py, spec ``hf_oracle.FAST_VLM``).

Logits, padded batches, generation, key layouts and the real-size parameter count against
transformers' ``fast_vlm`` are checked there for every family. Here: what a saved FastVLM folder
reads as, the pad-to-square processor against transformers' CLIP one, Apple's checkpoint layout
and config, the real-size tower's shapes, FLOPs and config errors.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from flop_oracle import flop_counter
from hf_oracle import FAST_VLM, fast_vlm_image_processor
from PIL import Image

import visorlib
from visorlib.hub import load_state_into
from visorlib.models.fast_vlm.convert import convert_fastvlm_state, fastvlm_config_from_hf
from visorlib.models.llava_onevision import LlavaOnevisionProcessor

TILE, IMAGE_TOKEN = 128, 250
TOKENS = (TILE // 64) ** 2  # FastViT downsamples 64x: 2 x 2 visual tokens per image
TINY_FASTVIT = dict(layers=[1, 1, 1, 1, 1], embed_dims=[8, 16, 32, 64, 128])  # mci3's layout, tiny widths


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The untied tiny transformers FastVLM, visorlib's load of its saved folder, and its image processor."""
    hf = FAST_VLM.hf_model(tied=False)
    folder = FAST_VLM.save(hf, tmp_path_factory.mktemp("fastvlm"))
    return hf, visorlib.from_pretrained(folder, attn_implementation="eager"), fast_vlm_image_processor(FAST_VLM.tiny_card())


def prompt(*segments):
    """Random text ids and runs of image placeholders, as one row."""
    return torch.cat([torch.full((n,), IMAGE_TOKEN) if image else torch.randint(0, 240, (n,))
                      for image, n in segments])


def test_checkpoint_config(pair):
    _, ours, _ = pair
    cfg = ours.cfg
    assert cfg.family == "fast_vlm" and not cfg.use_image_newline and ours.image_newline is None
    assert (cfg.vision.kind, cfg.vision.timm_model, cfg.vision.image_size) == ("fastvit", "fastvit_mci3", TILE)
    assert (cfg.vision.hidden_size, cfg.vision.patch_size, cfg.vision.timm_kwargs) == (256, 64, TINY_FASTVIT)
    assert cfg.processing.aspect_mode == "pad" and cfg.processing.image_std == [1.0, 1.0, 1.0]
    assert not cfg.decoder.tie_word_embeddings and cfg.tokens.image_token_id == IMAGE_TOKEN


def test_processor_pads_to_a_square_then_matches_transformers(pair):
    """visorlib pads with the mean colour (black) like Apple's ``image_aspect_ratio: pad``; the
    padded square then goes through exactly transformers' CLIP preprocessing (resize + /255)."""
    _, ours, hf_processor = pair
    ours_processor = LlavaOnevisionProcessor(ours.cfg)
    g = torch.Generator().manual_seed(0)
    for height, width in [(96, 96), (70, 150), (300, 90)]:
        image = Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())
        side = max(height, width)
        square = Image.new("RGB", (side, side), (0, 0, 0))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        expected = hf_processor(images=square, return_tensors="pt")["pixel_values"]
        got = ours_processor(images=image)
        assert got["pixel_values"].shape == (1, 1, 3, TILE, TILE)
        torch.testing.assert_close(got["pixel_values"][:, 0], expected, atol=1e-6, rtol=0)
        assert ours_processor.num_image_tokens((height, width)) == TOKENS


# Apple's MobileCLIP FastViT keeps one flat `network` list; for mci3's five stages its entries are:
# stage 0 blocks, then per later stage its downsampling, (attention stages) positional conv, blocks.
APPLE_NETWORK = {(0, "blocks"): 0, (1, "downsample"): 1, (1, "blocks"): 2, (2, "downsample"): 3, (2, "blocks"): 4,
                 (3, "downsample"): 5, (3, "pos_emb"): 6, (3, "blocks"): 7, (4, "downsample"): 8, (4, "pos_emb"): 9,
                 (4, "blocks"): 10}


def apple_key(key: str) -> str:
    """A visorlib key written the way Apple's ``llava_qwen2`` FastVLM checkpoints name it."""
    if key.startswith("vision_tower.timm_model."):
        key = key[len("vision_tower.timm_model."):]
        match = re.match(r"stages\.(\d)\.(blocks|downsample|pos_emb)\.", key)
        if match:
            head = f"network.{APPLE_NETWORK[int(match[1]), match[2]]}."
            key = head + ("proj." if match[2] == "downsample" else "") + key[match.end():]
            key = key.replace("proj.proj.", "proj.").replace("proj.0.reparam_conv.", "proj.0.lkb_reparam.")
        key = re.sub(r"^stem\.", "patch_embed.", re.sub(r"^final_conv\.", "conv_exp.", key))
        key = key.replace(".se.fc1.", ".se.reduce.").replace(".se.fc2.", ".se.expand.").replace(".mlp.", ".convffn.")
        return "model.vision_tower.vision_tower.model." + re.sub(r"\.gamma$", "", key)
    key = key.replace("projector.linear_1.", "model.mm_projector.0.").replace("projector.linear_2.", "model.mm_projector.2.")
    return key.replace("decoder.lm_head.", "lm_head.").replace("decoder.", "model.")


def test_apple_checkpoint_layout(pair):
    _, ours, _ = pair
    state = {apple_key(k): v for k, v in ours.state_dict().items()}
    state["model.vision_tower.vision_tower.model.head.proj"] = torch.zeros(256, 768)  # CLIP projection: unused
    # Names as Apple's modules produce them (checked against ml-fastvlm's mci.py at this size).
    for key in ["network.1.proj.0.lkb_reparam.weight", "network.6.reparam_conv.weight", "network.0.0.layer_scale",
                "network.10.0.layer_scale_2", "network.7.0.convffn.conv.bn.running_var", "conv_exp.se.reduce.bias",
                "patch_embed.0.reparam_conv.weight", "network.9.reparam_conv.bias", "network.10.0.token_mixer.qkv.weight"]:
        assert "model.vision_tower.vision_tower.model." + key in state, key
    assert {"model.mm_projector.0.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"} <= set(state)
    model = visorlib.zoo.instantiate(ours.cfg, "meta")
    load_state_into(model, convert_fastvlm_state(state, tied=False), "apple layout")
    ids = prompt((False, 2), (True, TOKENS), (False, 3))[None]
    pixels = torch.randn(1, 3, TILE, TILE)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels).logits)


def test_apple_config_is_the_zoo_architecture():
    # The fields of apple/FastVLM-0.5B's config.json that visorlib reads.
    apple = dict(model_type="llava_qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                 max_position_embeddings=32768, vocab_size=151936, tie_word_embeddings=True,
                 mm_hidden_size=3072, mm_projector_type="mlp2x_gelu", mm_vision_tower="mobileclip_l_1024",
                 image_aspect_ratio="pad", mm_patch_merge_type="flat")
    cfg = fastvlm_config_from_hf(apple, "apple/config.json")
    card = visorlib.get_config("fastvlm-0.5b")
    assert cfg.vision == card.vision and cfg.processing == card.processing
    assert cfg.decoder.num_layers == 24 and cfg.decoder.vocab_size == 151936
    with pytest.raises(visorlib.config.ConfigError, match="mm_vision_tower"):
        fastvlm_config_from_hf(dict(apple, mm_vision_tower="openai/clip-vit-large-patch14-336"), "x")


def test_real_size_tower_shapes_on_meta():
    # Parameter counts against transformers: tests/test_parity.py.
    ours = visorlib.build("fastvlm-0.5b", device="meta")
    # 64x downsampling: 256 tokens of width 3072 at 1024 px, 36 at 384 px.
    assert ours.vision_tower(torch.empty(1, 3, 1024, 1024, device="meta")).shape == (1, 256, 3072)
    assert ours.vision_tower(torch.empty(1, 3, 384, 384, device="meta")).shape == (1, 36, 3072)
    assert LlavaOnevisionProcessor(ours.cfg).num_image_tokens((700, 1300)) == 256


@pytest.mark.parametrize("card", ["fastvlm-0.5b", "visor-fastvlm-0.5b"])
def test_flops_match_flop_counter(card):
    cfg = visorlib.get_config(card).tiny()
    if cfg.visor is not None:  # a short decoder keeps the test quick; CA at 0 and 3, SA 1, 2, 4
        cfg = cfg.with_overrides({"decoder": {"num_layers": 6}, "visor": {
            "ca_layers": [0, 3], "sa_layers": [1, 2, 4], "configurations": [], "default": None, "router": False}})
    torch.manual_seed(0)
    model = visorlib.zoo.instantiate(cfg).eval()
    sa_layers = [1, 4] if cfg.visor is not None else None
    ids = prompt((False, 5), (True, TOKENS), (False, 6), (True, TOKENS), (False, 3))[None]
    with flop_counter() as counter:
        model(ids, pixel_values=torch.randn(2, 3, TILE, TILE), logits_to_keep=1, sa_layers=sa_layers)
    report = visorlib.flops(model, n_visual=2 * TOKENS, n_text=14, tiles=2, sa_layers=sa_layers)
    assert report.components["vision_tower"] > 0.5 * report.total  # the tower dominates at this size
    assert report.total == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_config_errors():
    with pytest.raises(visorlib.config.ConfigError, match="contradicts timm architecture 'fastvit_mci3'"):
        visorlib.get_config("fastvlm-0.5b", vision={"hidden_size": 1024})
    with pytest.raises(visorlib.config.ConfigError, match="aspect_mode"):
        visorlib.get_config("fastvlm-0.5b", processing={"aspect_mode": "crop"})
    hf = json.loads(json.dumps(dict(model_type="fast_vlm", vision_config=dict(model_args={}))))
    with pytest.raises(visorlib.config.ConfigError, match="inference_mode"):
        fastvlm_config_from_hf(hf, "config.json")
