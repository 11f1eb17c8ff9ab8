"""Input pipeline: images/videos -> pixel tensors, text -> token ids, chat prompts.

``anyres`` holds the tiling and token-count arithmetic shared with the model; the rest turns
user inputs into exactly the tensors transformers' LLaVA-OneVision (``processor``) and Qwen2-VL
(``qwen2_vl``: smart resize, flattened patches) processors would produce.
"""

from . import anyres
from .chat import apply_chat_template, apply_qwen2_vl_chat_template, media_in_messages
from .image import preprocess_images, preprocess_video
from .processor import ChatProcessor, LlavaOnevisionProcessor
from .qwen2_vl import Qwen2VLProcessor
from .tokenizer import Tokenizer

__all__ = [
    "ChatProcessor",
    "LlavaOnevisionProcessor",
    "Qwen2VLProcessor",
    "Tokenizer",
    "anyres",
    "apply_chat_template",
    "apply_qwen2_vl_chat_template",
    "media_in_messages",
    "preprocess_images",
    "preprocess_video",
]
