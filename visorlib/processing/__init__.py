"""Input pipeline pieces every family shares: images/videos -> pixel tensors, text -> token ids, chat prompts.

``anyres`` holds the tiling and token-count arithmetic shared with the model; the shared
:class:`ChatProcessor` turns prompts into ids. Each family's processor (the exact tensors
transformers' processor of that family would produce) lives in its folder:
:class:`visorlib.models.llava_onevision.LlavaOnevisionProcessor`,
:class:`visorlib.models.qwen2_vl.Qwen2VLProcessor` (also exported as ``visorlib.LlavaOnevisionProcessor``
and ``visorlib.Qwen2VLProcessor``).
"""

from . import anyres
from .chat import apply_chat_template, apply_qwen2_vl_chat_template, media_in_messages
from .image import preprocess_images, preprocess_video
from .processor import ChatProcessor
from .tokenizer import Tokenizer

__all__ = [
    "ChatProcessor",
    "Tokenizer",
    "anyres",
    "apply_chat_template",
    "apply_qwen2_vl_chat_template",
    "media_in_messages",
    "preprocess_images",
    "preprocess_video",
]
