"""Qwen2-VL specifics next to the shared parity suite (tests/test_parity.py, spec ``hf_oracle.QWEN2_VL``).

Logits, padded batches, generation, key layouts and the real-size parameter count are checked
there for every family. Here: the 4.x flat ``config.json`` reader, the in-memory key layout's
names, and the processor against transformers' on tensors (built from config objects and a
tokenizer trained on the fly: nothing is downloaded), chat template included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_oracle import QWEN2_VL, rename_saved_keys
from PIL import Image

import visorlib
from visorlib.models.qwen2_vl import Qwen2VLProcessor
from visorlib.processing import Tokenizer
from visorlib.processing.templates import QWEN2_VL_TEMPLATE

transformers = pytest.importorskip("transformers")


def test_in_memory_layout_moves_the_tower_under_model(tmp_path):
    # tests/test_parity.py loads every layout; here: the v5-runtime one really names the tower as
    # transformers 5 keeps it in memory (``model.visual.*``), not as it saves it (``visual.*``).
    folder = QWEN2_VL.save(QWEN2_VL.hf_model(tied=False, seed=3), tmp_path)
    renamed = rename_saved_keys(folder, QWEN2_VL.layouts["v5-runtime"])
    assert any(k.startswith("model.visual.") for k in renamed.values())
    assert not any(k.startswith("visual.") for k in renamed.values())


def test_hub_style_flat_config_is_read():
    from visorlib.models.qwen2_vl.convert import config_from_hf

    # The layout of Qwen/Qwen2-VL-2B-Instruct's config.json (transformers 4.4x): language model
    # keys at the top level, M-RoPE in rope_scaling, the vision width under embed_dim.
    hub = {"model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
           "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "vocab_size": 151936, "tie_word_embeddings": True, "image_token_id": 151655, "video_token_id": 151656,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "use_sliding_window": False,
           "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                             "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    cfg = config_from_hf(hub, "config.json", "qwen2-vl-2b")
    card = visorlib.get_config("qwen2-vl-2b")
    assert cfg.vision == card.vision and cfg.decoder == card.decoder and cfg.tokens == card.tokens
    assert cfg.processing == card.processing


# -- processor ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["What is shown in this image? You are a helpful assistant."] * 10, trainer)
    tok.add_special_tokens(specials)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    ours_tok = Tokenizer.from_file(folder / "tokenizer.json")
    ids = {"image_token_id": ours_tok.token_to_id("<|image_pad|>"), "video_token_id": ours_tok.token_to_id("<|video_pad|>"),
           "pad_token_id": ours_tok.pad_token_id}
    # The real card's processing, but at most 300 visual tokens an image to keep the test small.
    cfg = visorlib.get_config("qwen2-vl-2b", tokens=ids, processing={"max_pixels": 300 * 28 * 28})
    p = cfg.processing
    sizes = dict(min_pixels=p.min_pixels, max_pixels=p.max_pixels, image_mean=p.image_mean, image_std=p.image_std)
    hf = transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes),
        video_processor=transformers.Qwen2VLVideoProcessor(**sizes),
        tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                       eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    )
    return Qwen2VLProcessor(cfg, ours_tok), hf


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_processor_matches_transformers(processors):
    ours, hf = processors
    images = [_image(100, 150, 0), _image(37, 500, 1), _image(900, 700, 2)]  # round, thin, scaled down
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"},
                                             {"type": "image"}]}]
    prompts = [ours.apply_chat_template(messages), ours.apply_chat_template([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "image"}, "Describe."]}])]
    got = ours(text=prompts, images=[images[:2], images[2:]])
    expected = hf(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(got[key], expected[key]), key
    assert got["image_grid_thw"].tolist() == [[1, 8, 10], [1, 2, 36], [1, 38, 30]]
    assert [ours.num_image_tokens(im.size[::-1]) for im in images] == [20, 18, 285]


def test_video_processor_matches_transformers(processors):
    ours, hf = processors
    frames = [_image(90, 120, seed) for seed in range(5)]  # odd: the last frame is repeated
    prompt = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    got = ours(text=prompt, videos=[frames])
    expected = hf(text=prompt, videos=[frames], return_tensors="pt", videos_kwargs={"cap_pixels_per_frame": False})
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(got[key], expected[key]), key
    assert ours.num_video_tokens(5, (90, 120)) == int((got["input_ids"] == ours.cfg.tokens.video_token_id).sum())


def test_chat_template_matches_the_hub_template(processors):
    ours, hf = processors
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                             {"type": "text", "text": " and "}, {"type": "video"}]},
                {"role": "assistant", "content": "Done."}, {"role": "user", "content": "Why?"}]
    expected = hf.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    with_ids = hf.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE, add_vision_id=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=False, add_vision_id=True) == with_ids




def test_video_file_matches_transformers(processors, tmp_path):
    """A .mp4 path: pixels, grid and placeholder counts equal transformers', all frames and sampled
    (fps sampling: the index rule is checked against transformers in test_video.py)."""
    pytest.importorskip("av", reason="PyAV is not installed (pip install 'visorlib[video]')")
    from transformers.video_utils import load_video
    from video_helpers import write_mp4

    ours, hf = processors
    clip = str(write_mp4(tmp_path / "clip.mp4", frames=6, size=(56, 84)))
    # transformers' processors decode paths with torchcodec (not installed here); its own PyAV
    # loader gives the frames it would process (test_video.py checks ours equal them).
    frames, _ = load_video(clip, backend="pyav")
    prompt = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    for sampling in ({}, {"num_frames": 4}):
        ours.video_num_frames, ours.video_fps = sampling.get("num_frames"), sampling.get("fps")
        try:
            got = ours(text=prompt, videos=[clip])
        finally:
            ours.video_num_frames = ours.video_fps = None
        kwargs = {"cap_pixels_per_frame": False, "do_sample_frames": bool(sampling), **sampling}
        expected = hf(text=prompt, videos=[frames], return_tensors="pt", videos_kwargs=kwargs)
        for key in ("input_ids", "pixel_values_videos", "video_grid_thw"):
            assert torch.equal(got[key], expected[key]), (sampling, key)
