"""Tiny VISOR models and inputs shared by the VISOR tests, and ``CASES``: one case per model family.

The tiny models come from tests/cases_base.py and LLaVA-OneVision's inputs from
tests/cases_llava.py; both are re-exported here for the tests that use LLaVA-OneVision as the
default family. A new family adds its case (tests/cases_<family>.py) to ``CASES``.
"""

from __future__ import annotations

from cases_base import ROUTING, build, tiny_cfg
from cases_fastvlm import FastVLMCase
from cases_internvl import InternVLCase
from cases_llava import LlavaCase, batch, row_inputs, sample
from cases_qwen2_5_vl import Qwen25VLCase
from cases_qwen2_vl import Qwen2VLCase

CASES = [LlavaCase(), Qwen2VLCase(), FastVLMCase(), Qwen25VLCase(), InternVLCase()]

__all__ = ["CASES", "ROUTING", "batch", "build", "row_inputs", "sample", "tiny_cfg", "word_tokenizer"]


def word_tokenizer(folder, cfg):
    """A word-level tokenizer whose special ids agree with the tiny card."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<image>": cfg.tokens.image_token_id,
                "<video>": cfg.tokens.video_token_id}
    words = ["user", "assistant", "what", "is", "this", "?", "\n", "[UNK]"] + [f"w{i}" for i in range(200)]
    vocab = dict(specials)
    for word in words:
        vocab.setdefault(word, len(vocab) + 2)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(list(specials))
    tok.save(str(folder / "tokenizer.json"))
