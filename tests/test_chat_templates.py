"""Chat templates: rendered with jinja2's sandbox from the checkpoint's template, as transformers does.

For every family, the prompts of a text-only, a single-image, a multi-image and a video
conversation equal transformers' ``processor.apply_chat_template`` for the same template string;
a checkpoint's own template (``chat_template.jinja`` / ``chat_template.json`` /
``tokenizer_config.json``) replaces the card's built-in one; malicious templates (attribute
walking, ``__class__``, file access, mutation) are refused with an error naming the template.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import visorlib
from visorlib.processing.templates import ChatTemplateError, load_chat_template, render_chat_template
from visorlib.registry import family_of

transformers = pytest.importorskip("transformers")

CARDS = {"llava_onevision": "llava-ov-0.5b", "qwen2_vl": "qwen2-vl-2b", "fast_vlm": "fastvlm-0.5b"}

CONVERSATIONS = {
    "text": [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}],
    "single-image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
    "multi-image": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                     {"type": "text", "text": " with "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ],
    "video": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["What is shown in this image? You are a helpful assistant."] * 4, trainer)
    tok.add_special_tokens(SPECIALS)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def hf_tokenizer(folder):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")


def hf_processor(family: str, tokenizer, template: str):
    """The transformers processor of each family, given the same template string."""
    if family == "llava_onevision":
        return transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessor(), tokenizer=tokenizer,
            video_processor=transformers.LlavaOnevisionVideoProcessor(), num_image_tokens=4,
            vision_feature_select_strategy="full", chat_template=template)
    if family == "qwen2_vl":
        return transformers.Qwen2VLProcessor(image_processor=transformers.Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                             video_processor=transformers.Qwen2VLVideoProcessor(), chat_template=template)
    return transformers.LlavaProcessor(image_processor=transformers.CLIPImageProcessor(), tokenizer=tokenizer,
                                       patch_size=64, vision_feature_select_strategy="full", chat_template=template)


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(CARDS))
def test_prompts_equal_transformers_for_the_same_template(family, kind, tokenizer_dir):
    cfg = visorlib.get_config(CARDS[family]).tiny()
    ours = family_of(cfg).processor_class(cfg)
    theirs = hf_processor(family, hf_tokenizer(tokenizer_dir), ours.chat_template)
    conversation = CONVERSATIONS[kind]
    if family == "fast_vlm" and kind == "video":
        pytest.skip("FastVLM takes no videos (transformers' LlavaProcessor has no video processor)")
    for generation_prompt in (True, False):
        expected = theirs.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
        assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected


CUSTOM = ("{% for m in messages %}[{{ m['role'] | upper }}]{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
          "<|im_end|>{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")


def tokenizer_cfg(tokenizer_dir):
    tok = visorlib.processing.Tokenizer.from_file(tokenizer_dir / "tokenizer.json")
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    return cfg.with_overrides({"tokens": {"image_token_id": tok.token_to_id("<image>"),
                                          "video_token_id": tok.token_to_id("<video>")}})


@pytest.mark.parametrize("layout", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_the_checkpoints_own_template_replaces_the_built_in_one(tmp_path, tokenizer_dir, layout):
    """A fine-tuned checkpoint with another template gets its prompt, not the base model's."""
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    if layout == "chat_template.jinja":
        (tmp_path / layout).write_text(CUSTOM)
    else:
        (tmp_path / layout).write_text(json.dumps({"chat_template": CUSTOM}))
    cfg = tokenizer_cfg(tokenizer_dir)
    processor = family_of(cfg).processor(cfg, tmp_path)
    messages = CONVERSATIONS["single-image"]
    assert processor.apply_chat_template(messages) == "[USER]<image>What is shown?<|im_end|>[ASSISTANT]"
    theirs = hf_processor("llava_onevision", hf_tokenizer(tokenizer_dir), CUSTOM)
    assert processor.apply_chat_template(messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                                  tokenize=False)
    # The prompt the model is fed (processor.chat) is the rendered one, placeholders expanded.
    image = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    ids = processor.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "What is shown?"}]}])["input_ids"][0]
    text = processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert text.startswith("[USER]<image>") and text.endswith("What is shown?<|im_end|>[ASSISTANT]")
    # Without a template the card's built-in one (the llava-onevision-hf format) is used.
    (tmp_path / layout).unlink()
    plain = family_of(cfg).processor(cfg, tmp_path)
    assert plain.apply_chat_template(messages).startswith("<|im_start|>user <image>\nWhat is shown?")


def test_a_model_loaded_from_a_folder_uses_its_template(tmp_path, tokenizer_dir):
    cfg = tokenizer_cfg(tokenizer_dir)
    model = visorlib.zoo.instantiate(cfg)
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    (tmp_path / "chat_template.jinja").write_text(CUSTOM)
    processor = visorlib.processor_for(visorlib.from_pretrained(tmp_path))
    assert processor.apply_chat_template(CONVERSATIONS["text"]) == "[USER]Hello there.<|im_end|>[ASSISTANT]"


MALICIOUS = {
    "class walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "printed dunder": "{{ messages.__class__ }}",
    "globals": "{{ cycler.__init__.__globals__ }}",
    "format string": "{{ '{0.__class__}'.format(messages) }}",
    "mutation": "{{ messages.append(1) }}",
    "file include": "{% include '/etc/passwd' %}",
    "raise_exception": "{{ raise_exception('no system role allowed') }}",
}


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_malicious_templates_are_refused_clearly(name):
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template(MALICIOUS[name], CONVERSATIONS["text"], source="evil/chat_template.jinja")
    assert "evil/chat_template.jinja" in str(err.value)
    if name in ("class walk", "printed dunder", "globals"):
        assert "refused by the sandbox" in str(err.value) and "__" in str(err.value)


def test_a_malicious_checkpoint_template_names_its_file(tmp_path, tokenizer_dir):
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    (tmp_path / "chat_template.jinja").write_text(MALICIOUS["class walk"])
    cfg = tokenizer_cfg(tokenizer_dir)
    processor = family_of(cfg).processor(cfg, tmp_path)
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja was refused by the sandbox.*__class__"):
        processor.apply_chat_template(CONVERSATIONS["text"])
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": 7}))
    with pytest.raises(ChatTemplateError, match=r"chat_template\.json: chat_template must be a string"):
        load_chat_template(tmp_path)
