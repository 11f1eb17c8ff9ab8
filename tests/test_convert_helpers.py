"""The shared converter helpers (visorlib.modules.convert): renamer, option check, Qwen2 reader."""

from __future__ import annotations

import pytest
import torch

from visorlib.config import ConfigError
from visorlib.hub import CheckpointError
from visorlib.models.fast_vlm.convert import apple_fastvit_key_map
from visorlib.models.llava_onevision.convert import convert_llava_onevision_state
from visorlib.modules.convert import (
    TIED_LM_HEAD,
    check_rope_types,
    qwen2_decoder_config,
    rename_keys,
    require_value,
)

# Every key a default is asked for; values the tests' configs never leave to them.
DEFAULTS = dict(vocab_size=1, hidden_size=8, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
                rope_theta=1.0, rms_norm_eps=1.0, max_position_embeddings=1, mrope_section=[1, 1, 1])


# -- rename_keys ----------------------------------------------------------------------------------


def test_rules_apply_in_order_each_to_what_the_earlier_left():
    t = torch.zeros(1)
    rules = [(r"^model\.language_model\.", "model."), (r"^model\.", "decoder.")]
    assert list(rename_keys({"model.language_model.norm.weight": t}, rules)) == ["decoder.norm.weight"]
    # Reversed, the fold comes too late: the second rule no longer sees "model.".
    assert list(rename_keys({"model.language_model.norm.weight": t}, rules[::-1])) == ["decoder.language_model.norm.weight"]
    # Backreferences work, and the tensors are the same objects (callers trace their files by id).
    out = rename_keys({"encoder.layers.3.mlp.fc1.weight": t}, [(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.")])
    assert list(out) == ["blocks.3.mlp.fc1.weight"] and out["blocks.3.mlp.fc1.weight"] is t


def test_unknown_keys_are_named_with_the_source():
    state = {"model.norm.weight": torch.zeros(1), "vision.x": torch.zeros(1), "extra.y": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"my layout: unrecognised keys \['extra\.y', 'vision\.x'\]"):
        rename_keys(state, [(r"^model\.", "decoder.")], source="my layout")
    many = {f"junk.{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(CheckpointError, match=r"'junk\.4'\] and 3 more"):
        rename_keys(many, [(r"^model\.", "decoder.")])


def test_identity_rule_keeps_and_ignored_drops():
    state = {"image_newline": torch.zeros(1), "lm_head.weight": torch.zeros(1), "head.proj": torch.zeros(1)}
    rules = [(r"^image_newline$", "image_newline"), (r"^lm_head\.", "decoder.lm_head.")]
    out = rename_keys(state, rules, ignored=(TIED_LM_HEAD, r"^head\."))
    assert list(out) == ["image_newline"]  # head.proj matched no rule, but is ignored, so not unknown
    assert list(rename_keys(state, rules, ignored=(r"^head\.",))) == ["image_newline", "decoder.lm_head.weight"]


def test_two_keys_mapping_to_one_name_are_refused():
    state = {"model.language_model.norm.weight": torch.zeros(1), "model.norm.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.norm\.weight' and 'model\.norm\.weight' "
                                              r"both map to 'decoder\.norm\.weight'"):
        rename_keys(state, [(r"^model\.language_model\.", "model."), (r"^model\.", "decoder.")])


def test_family_converters_refuse_keys_of_another_layout():
    state = {"language_model.model.norm.weight": torch.zeros(4), "text_model.embeddings.weight": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"LLaVA-OneVision checkpoint: unrecognised keys \['text_model\."):
        convert_llava_onevision_state(state, tied=True)
    with pytest.raises(CheckpointError, match=r"SigLIP vision tower: unrecognised keys \['encoder\.layers\.0\.bogus"):
        convert_llava_onevision_state({"vision_tower.vision_model.encoder.layers.0.bogus.weight": torch.zeros(1)}, True)


def test_apple_fastvit_map_is_timms_filter_plus_the_folded_convs():
    t = torch.zeros(1)
    state = {"patch_embed.0.reparam_conv.weight": t, "network.0.0.layer_scale": t, "network.1.proj.0.lkb_reparam.weight": t,
             "network.2.0.convffn.fc1.weight": t, "network.3.proj.1.reparam_conv.bias": t, "network.4.reparam_conv.weight": t,
             "network.5.0.layer_scale_1": t, "conv_exp.se.reduce.weight": t, "head.proj": t}
    assert sorted(apple_fastvit_key_map(state)) == sorted([
        "stem.0.reparam_conv.weight", "stages.0.blocks.0.layer_scale.gamma", "stages.1.downsample.proj.0.reparam_conv.weight",
        "stages.1.blocks.0.mlp.fc1.weight", "stages.2.downsample.proj.1.reparam_conv.bias",
        "stages.2.pos_emb.reparam_conv.weight", "stages.2.blocks.0.layer_scale_1.gamma", "final_conv.se.fc1.weight"])
    with pytest.raises(CheckpointError, match=r"'network\.1\.proj\.0\.lkb_origin\.conv\.weight' is a training-time branch"):
        apple_fastvit_key_map({"network.1.proj.0.lkb_origin.conv.weight": t})
    with pytest.raises(CheckpointError, match=r"Apple FastViT tower: unrecognised keys \['extra\.weight'\]"):
        apple_fastvit_key_map({"network.0.0.layer_scale": t, "extra.weight": t})


# -- require_value / check_rope_types -------------------------------------------------------------


def test_unsupported_option_names_file_key_and_what_is_supported():
    require_value("a/config.json", "hidden_act", "silu", ("silu",))
    with pytest.raises(ConfigError) as err:
        require_value("a/config.json", "text_config.hidden_act", "gelu", ("silu", "swish", "relu"))
    assert str(err.value) == ("a/config.json: text_config.hidden_act 'gelu' is not supported "
                              "(visorlib supports 'silu', 'swish' or 'relu')")
    with pytest.raises(ConfigError, match=r"^x\.json: use_sliding_window True is not supported \(visorlib supports False\)$"):
        require_value("x.json", "use_sliding_window", True, (False,))


def test_rope_types_are_checked_in_both_spellings():
    check_rope_types("c.json", {"rope_parameters": {"rope_type": "default"}, "rope_scaling": None}, ("default",))
    with pytest.raises(ConfigError, match=r"c\.json: text_config\.rope_scaling type 'yarn' is not supported"):
        check_rope_types("c.json", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, ("default",))
    with pytest.raises(ConfigError, match=r"c\.json: rope_parameters type 'linear' is not supported"):
        check_rope_types("c.json", {"rope_parameters": {"rope_type": "linear"}}, ("default", "mrope"), prefix="")
    with pytest.raises(ConfigError, match=r"rope_scaling must be a mapping or null, got 'yarn'"):
        check_rope_types("c.json", {"rope_scaling": "yarn"}, ("default",))


# -- qwen2_decoder_config ------------------------------------------------------------------------


def _qwen2(**overrides):
    from transformers import Qwen2Config

    fields = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=2048)
    return Qwen2Config(**{**fields, **overrides})


@pytest.mark.parametrize("nested", [True, False], ids=["text_config", "flat"])
def test_reads_a_real_qwen2_config(nested):
    hf = _qwen2(tie_word_embeddings=True)
    text = hf.to_dict()  # transformers 5 keeps rope_theta inside rope_parameters only
    assert "rope_theta" not in text and text["rope_parameters"]["rope_theta"] == 5e5
    config = {"model_type": "llava_onevision", "text_config": text} if nested else text
    dec = qwen2_decoder_config(config, "config.json", DEFAULTS)
    assert (dec.vocab_size, dec.hidden_size, dec.intermediate_size, dec.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (dec.num_heads, dec.num_kv_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert dec.rope_theta == hf.rope_parameters["rope_theta"] and dec.rms_norm_eps == hf.rms_norm_eps
    assert dec.max_position_embeddings == hf.max_position_embeddings and dec.tie_word_embeddings
    assert dec.mrope_section is None


def test_defaults_fill_only_what_the_file_omits():
    dec = qwen2_decoder_config({"hidden_size": 16, "num_attention_heads": 2, "tie_word_embeddings": False}, "c", DEFAULTS)
    assert (dec.hidden_size, dec.num_heads, dec.num_kv_heads, dec.vocab_size) == (16, 2, 2, 1)  # kv: one per head
    assert not dec.tie_word_embeddings
    # A top-level tie (multimodal configs) counts as much as one in text_config.
    assert qwen2_decoder_config({"tie_word_embeddings": True, "text_config": {"hidden_size": 8}}, "c",
                                DEFAULTS).tie_word_embeddings


def test_mrope_from_either_layout():
    flat = _qwen2().to_dict() | {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    del flat["rope_parameters"]
    assert qwen2_decoder_config(flat, "c", DEFAULTS, mrope=True).mrope_section == [2, 3, 3]
    nested = {"text_config": _qwen2().to_dict()}
    nested["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    dec = qwen2_decoder_config(nested, "c", DEFAULTS, mrope=True)
    assert dec.mrope_section == [4, 2, 2] and dec.rope_theta == 5e5
    # Without M-RoPE, an mrope rope type is refused (that decoder would ignore the sections).
    with pytest.raises(ConfigError, match=r"c: rope_scaling type 'mrope' is not supported"):
        qwen2_decoder_config(flat, "c", DEFAULTS)


def test_unsupported_decoder_options_are_refused_with_their_key():
    with pytest.raises(ConfigError, match=r"c\.json: text_config\.use_sliding_window True is not supported"):
        qwen2_decoder_config({"text_config": _qwen2(use_sliding_window=True, sliding_window=64).to_dict()},
                             "c.json", DEFAULTS)
    with pytest.raises(ConfigError, match=r"c\.json: hidden_act 'gelu' is not supported"):
        qwen2_decoder_config(_qwen2(hidden_act="gelu").to_dict(), "c.json", DEFAULTS)
    with pytest.raises(ConfigError, match=r"text_config\.head_dim must equal"):
        qwen2_decoder_config({"text_config": _qwen2().to_dict() | {"head_dim": 32}}, "c.json", DEFAULTS)
    # transformers 4.x put rope_scaling at the top level even next to a text_config.
    with pytest.raises(ConfigError, match=r"c\.json: rope_scaling type 'yarn' is not supported"):
        qwen2_decoder_config({"text_config": _qwen2().to_dict(), "rope_scaling": {"type": "yarn"}}, "c.json", DEFAULTS)
