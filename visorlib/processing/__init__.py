"""Input pipeline: images/videos -> pixel tensors, text -> token ids, chat prompts.

``anyres`` holds the tiling and token-count arithmetic shared with the model; the rest turns
user inputs into exactly the tensors transformers' LLaVA-OneVision processor would produce.
"""

from . import anyres
from .chat import apply_chat_template, media_in_messages
from .image import preprocess_images, preprocess_video
from .processor import LlavaOnevisionProcessor
from .tokenizer import Tokenizer

__all__ = [
    "LlavaOnevisionProcessor",
    "Tokenizer",
    "anyres",
    "apply_chat_template",
    "media_in_messages",
    "preprocess_images",
    "preprocess_video",
]
