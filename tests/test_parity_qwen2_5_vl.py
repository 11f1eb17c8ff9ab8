"""Qwen2.5-VL specifics next to the shared parity suite (tests/test_parity.py, spec ``hf_oracle.QWEN2_5_VL``).

Logits (windows, a full-attention block, videos with time-aligned positions), padded batches,
generation, key layouts and the real-size parameter count are checked there. Here: the Hub
``config.json`` reader (both released sizes against their cards), the window order against
transformers' own helper, and the processor's ``second_per_grid_ts`` against transformers'
``Qwen2_5_VLProcessor`` (pixels are Qwen2-VL's, checked in tests/test_parity_qwen2_vl.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import visorlib
from visorlib.config import ConfigError
from visorlib.models.qwen2_5_vl import Qwen25VLProcessor, window_order
from visorlib.models.qwen2_5_vl.convert import config_from_hf

transformers = pytest.importorskip("transformers")

# The layout of Qwen/Qwen2.5-VL-3B-Instruct's config.json (transformers 4.4x): the language model's
# keys at the top level, M-RoPE in rope_scaling, the vision width under hidden_size.
HUB_3B = {
    "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 151936,
    "max_position_embeddings": 128000, "tie_word_embeddings": True, "image_token_id": 151655,
    "video_token_id": 151656, "use_sliding_window": False, "hidden_act": "silu",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
HUB_7B = {**HUB_3B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
          "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
          "vision_config": {**HUB_3B["vision_config"], "out_hidden_size": 3584}}


@pytest.mark.parametrize(("hub", "card"), [(HUB_3B, "qwen2.5-vl-3b"), (HUB_7B, "qwen2.5-vl-7b")])
def test_hub_config_is_read_into_the_card(hub, card):
    cfg, expected = config_from_hf(hub, "config.json", card), visorlib.get_config(card)
    assert cfg.vision == expected.vision and cfg.decoder == expected.decoder and cfg.tokens == expected.tokens
    assert cfg.processing == expected.processing


def test_config_reader_refuses_what_it_does_not_implement():
    with pytest.raises(ConfigError, match="out_hidden_size"):
        config_from_hf({**HUB_3B, "vision_config": {**HUB_3B["vision_config"], "out_hidden_size": 1024}})
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf({**HUB_3B, "vision_config": {**HUB_3B["vision_config"], "hidden_act": "gelu"}})
    with pytest.raises(ConfigError, match="fullatt_block_indexes"):
        config_from_hf({**HUB_3B, "vision_config": {**HUB_3B["vision_config"], "fullatt_block_indexes": [40]}})


@pytest.mark.parametrize("grids", [[(1, 8, 12)], [(1, 10, 6), (3, 8, 8)], [(2, 36, 52)], [(1, 2, 2), (1, 16, 16)]])
def test_window_order_matches_transformers(grids):
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor(grids)
    order, lengths = window_order(grid, 2, 112 // 14 // 2)
    expected, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert torch.equal(order, expected)
    assert lengths == torch.diff(cu).tolist()


def _frame(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """``(visorlib's, transformers' Qwen2_5_VLProcessor)`` sharing a tokenizer trained on the fly."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from visorlib.processing import Tokenizer

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["What happens in this video?"] * 10, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                            "<|image_pad|>", "<|video_pad|>"])
    file = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(file))
    ours_tok = Tokenizer.from_file(file)
    ids = {"image_token_id": ours_tok.token_to_id("<|image_pad|>"), "video_token_id": ours_tok.token_to_id("<|video_pad|>"),
           "pad_token_id": ours_tok.pad_token_id}
    cfg = visorlib.get_config("qwen2.5-vl-3b", tokens=ids, processing={"max_pixels": 300 * 28 * 28})
    p = cfg.processing
    sizes = dict(min_pixels=p.min_pixels, max_pixels=p.max_pixels, image_mean=p.image_mean, image_std=p.image_std)
    hf = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes),
        video_processor=transformers.Qwen2VLVideoProcessor(**sizes),
        tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), eos_token="<|im_end|>",
                                                       pad_token="<|endoftext|>"),
    )
    return Qwen25VLProcessor(cfg, ours_tok), hf


@pytest.mark.parametrize("fps", [2.0, 4.0])
def test_video_inputs_and_seconds_per_temporal_patch_match_transformers(processors, fps):
    from transformers.video_utils import VideoMetadata

    ours, hf = processors
    ours.fps = fps
    videos = [[_frame(s) for s in range(4)], [_frame(s) for s in range(5)]]  # 5: the last frame is repeated
    prompt = "<|vision_start|><|video_pad|><|vision_end|>What happens?<|vision_start|><|video_pad|><|vision_end|>"
    got = ours(text=prompt, videos=videos)
    # transformers reads the rate from the videos' metadata (24 fps when frames come without any);
    # visorlib's processor takes it as ``fps`` (2, the rate Qwen2.5-VL's own tooling samples at).
    metadata = [VideoMetadata(total_num_frames=len(v), fps=fps) for v in videos]
    expected = hf(text=prompt, videos=videos, video_metadata=metadata, return_tensors="pt",
                  videos_kwargs={"cap_pixels_per_frame": False})
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(got[key], torch.as_tensor(expected[key], dtype=got[key].dtype)), key
    assert got["second_per_grid_ts"].tolist() == [2 / fps] * 2
    assert "second_per_grid_ts" not in ours(images=[_frame(0)])


def test_second_per_grid_ts_must_give_one_value_per_video():
    cfg = visorlib.get_config("qwen2.5-vl-3b").tiny()
    model = visorlib.zoo.instantiate(cfg).eval()
    video = cfg.tokens.video_token_id
    ids = torch.cat([torch.full((1, 3 * 16), video), torch.randint(0, 200, (1, 3))], 1)
    inputs = dict(pixel_values_videos=torch.randn(3 * 64, model.vision_tower.patch_dim),
                  video_grid_thw=torch.tensor([[3, 8, 8]]))
    with pytest.raises(visorlib.models.InputError, match="second_per_grid_ts holds 2 values"):
        model(ids, **inputs, second_per_grid_ts=torch.tensor([1.0, 2.0]))
    with torch.no_grad():  # the step moves the frames apart in time: different positions, different logits
        slow, fast = (model(ids, **inputs, second_per_grid_ts=torch.tensor([s])).logits for s in (0.5, 2.0))
    assert not torch.allclose(slow, fast)
