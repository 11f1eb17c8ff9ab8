"""visorlib's Qwen2-VL against transformers' (fp32, eager attention), litgpt-style.

The same tiny random model exists in both libraries: transformers builds and saves it, visorlib
loads the saved folder with its own converter, and the logits must agree to 1e-4. The processor
is compared on tensors (built from config objects and a tokenizer trained on the fly: nothing is
downloaded), and the real-size card on parameter count (both built on the meta device).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_oracle import left_pad, randomize_norms_and_biases
from PIL import Image

import visorlib
from visorlib.models.qwen2_vl import Qwen2VLProcessor
from visorlib.processing import Tokenizer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
IMAGE, VIDEO, START, END = 250, 251, 248, 249
PATCH_DIM = 3 * 2 * 6 * 6  # channels x frames x 6-px patches of the tiny tower


def tiny_hf_model(tied: bool, seed: int = 0):
    """A random fp32 transformers Qwen2-VL (3 layers, width 64, M-RoPE [2, 3, 3]) with eager attention."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=4, patch_size=6),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=tied,
    )
    return randomize_norms_and_biases(transformers.Qwen2VLForConditionalGeneration(cfg), ("norm", "ln_q"))


def save_v5_runtime_names(hf, folder):
    """Save with transformers 5's in-memory key names (``model.language_model.*``, ``model.visual.*``)."""
    from safetensors.torch import load_file, save_file

    hf.save_pretrained(folder)
    file = folder / "model.safetensors"
    state = load_file(file)
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.")
                else k): v for k, v in state.items()}
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(tied=request.param)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)  # transformers 5.23 writes the Hub layout: model.*, visual.*, lm_head.*
    ours = visorlib.from_pretrained(folder, attn_implementation="eager")
    assert ours.cfg.family == "qwen2_vl" and ours.cfg.decoder.tie_word_embeddings == request.param
    return hf, ours


def visual(grid, token=IMAGE):
    """A placeholder run for one image/video of patch grid ``(t, h, w)``, wrapped as the template does."""
    t, h, w = grid
    return torch.cat([torch.tensor([START]), torch.full((t * h * w // 4,), token), torch.tensor([END])])


def row(*segments, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([s if isinstance(s, torch.Tensor) else torch.randint(0, 240, (s,), generator=g) for s in segments])


def vision_inputs(images=(), videos=()):
    out = {}
    for kind, grids in (("image", images), ("video", videos)):
        if grids:
            grid = torch.tensor(grids)
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            out[key] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM)
            out[f"{kind}_grid_thw"] = grid
    return out


def compare(hf, ours, ids, mask=None, **vision):
    mm = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()  # transformers needs it next to grid_thw
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, **vision).logits
        got = ours(ids, mask, **vision).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    return got


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 2, 2), (1, 10, 4), (1, 2, 16)], ids=lambda g: "x".join(map(str, g[1:])))
def test_single_image(pair, grid):
    compare(*pair, row(3, visual(grid), 6)[None], **vision_inputs(images=[grid]))


def test_two_images(pair):
    grids = [(1, 4, 6), (1, 6, 2)]
    compare(*pair, row(2, visual(grids[0]), 3, visual(grids[1]), 4)[None], **vision_inputs(images=grids))


def test_video_and_image(pair):
    # Videos whose temporal patches outnumber neither merged side: see the docs on M-RoPE.
    video, image = (2, 4, 4), (1, 4, 2)
    ids = row(3, visual(video, VIDEO), 2, visual(image), 5)[None]
    compare(*pair, ids, **vision_inputs(images=[image], videos=[video]))


def test_text_only(pair):
    compare(*pair, row(17)[None])


def test_left_padded_batch(pair):
    grids = [(1, 4, 6), (1, 2, 4)]
    rows = [row(3, visual(grids[0]), 9), row(1, visual(grids[1]), 2, seed=1)]
    ids, mask = left_pad(rows)
    vision = vision_inputs(images=grids)
    got = compare(*pair, ids, mask, **vision)
    _, ours = pair
    patches = [int(torch.tensor(g).prod()) for g in grids]  # each row alone, unpadded, agrees too
    for i, r in enumerate(rows):
        pixels = vision["pixel_values"][sum(patches[:i]): sum(patches[: i + 1])]
        with torch.no_grad():
            alone = ours(r[None], pixel_values=pixels, image_grid_thw=vision["image_grid_thw"][i: i + 1]).logits[0]
        torch.testing.assert_close(got[i, ids.shape[1] - len(r):], alone, atol=ATOL, rtol=0)


def test_sdpa_matches_eager(pair):
    hf, ours = pair
    ours.cfg.attn_implementation = "sdpa"  # the default path (tower and decoder), against the eager oracle
    try:
        grids = [(1, 4, 6), (1, 6, 2)]
        compare(hf, ours, row(2, visual(grids[0]), 3, visual(grids[1]), 4)[None], **vision_inputs(images=grids))
    finally:
        ours.cfg.attn_implementation = "eager"


def test_greedy_generation_matches(pair):
    hf, ours = pair
    grids = [(1, 4, 6), (1, 6, 2)]
    ids, mask = left_pad([row(3, visual(grids[0]), 4), row(2, visual(grids[1]), 1, seed=1)])
    vision = vision_inputs(images=grids)
    mm = (ids == IMAGE).long()
    expected = hf.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, **vision, max_new_tokens=20,
                           min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, mask, max_new_tokens=20, eos_token_id=[], **vision)
    assert got.shape == expected.shape == (2, ids.shape[1] + 20)
    assert torch.equal(got, expected)


def test_transformers_in_memory_key_names_load(tmp_path):
    hf = tiny_hf_model(tied=False, seed=3)
    ours = visorlib.from_pretrained(save_v5_runtime_names(hf, tmp_path), attn_implementation="eager")
    grid = (1, 4, 4)
    compare(hf, ours, row(2, visual(grid), 3)[None], **vision_inputs(images=[grid]))


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


# The real Qwen/Qwen2-VL-2B-Instruct architecture, for transformers' meta-device reference model.
REAL_2B = dict(
    text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14),
    tie_word_embeddings=True,
)


def test_real_size_parameter_count_matches_transformers():
    with torch.device("meta"):
        hf = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**REAL_2B))
    ours = visorlib.build("qwen2-vl-2b", device="meta")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == 2_208_985_600


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


# chat_template.json of Qwen/Qwen2-VL-2B-Instruct, verbatim.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
