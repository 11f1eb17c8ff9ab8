"""Chat prompts: the family's placeholder names, and the conversation -> prompt step.

A processor renders a conversation with its checkpoint's own Jinja chat template (or its card's
built-in one), in a sandbox: :mod:`.templates`. The two functions here render the built-in
templates directly, for code that has no processor at hand:

* :func:`apply_chat_template` — the ``llava-hf/llava-onevision-*`` format (Qwen2 ChatML variant):
  ``<|im_start|>{role} {"<image>" per image}{"<video>" per video}{"\\n" + text per text}<|im_end|>``,
  no default system prompt, no newline after ``<|im_end|>``; within a message all images, then all
  videos, then all texts, whatever their order in ``content``;
* :func:`apply_qwen2_vl_chat_template` — the ``Qwen/Qwen2-VL-*`` format: a default system turn,
  parts in their order, each image as ``<|vision_start|><|image_pad|><|vision_end|>``.

Two deliberate differences from rendering the templates with transformers, both from
:func:`.templates.normalize_messages`: ``content`` given as a plain string is one text part (the
LLaVA-OneVision template iterates the string's characters and silently drops the text), and a part
of an unknown ``type`` raises ``ValueError`` instead of being skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .templates import LLAVA_ONEVISION_TEMPLATE, QWEN2_VL_TEMPLATE, normalize_messages, render_chat_template

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN2_VL_SYSTEM = "You are a helpful assistant."


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation with the llava-onevision-hf template.

    Args:
        messages: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
            "..."}]}, ...]``; ``content`` may also be a plain string. A single message dict is
            accepted too.
        add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model answers next.

    Returns:
        The prompt, with one ``<image>`` / ``<video>`` placeholder per image / video part (the
        processor expands each into the right number of visual tokens).

    Raises:
        ValueError: Malformed messages or parts.
    """
    return render_chat_template(LLAVA_ONEVISION_TEMPLATE, messages, add_generation_prompt,
                                source="the llava-onevision chat template")


def apply_qwen2_vl_chat_template(
    messages: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
) -> str:
    """Render a conversation with the Qwen2-VL template.

    Args:
        messages: As for :func:`apply_chat_template`.
        add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model answers next.
        add_vision_id: Prefix each image with ``Picture N: `` and each video with ``Video N: ``.

    Returns:
        The prompt, with one ``<|image_pad|>`` / ``<|video_pad|>`` per image / video (the
        processor expands each into the right number of visual tokens).
    """
    return render_chat_template(QWEN2_VL_TEMPLATE, messages, add_generation_prompt,
                                source="the qwen2_vl chat template", add_vision_id=add_vision_id)


def media_in_messages(messages: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """Images and videos embedded in the parts, in prompt order.

    An image part carries its object under ``image``; a video part its frames or object under
    ``video``, or a file under ``path`` (decoded by :mod:`.video`). Within each kind the order is
    the parts' order, so the i-th image returned fills the i-th image placeholder. Parts without
    an embedded object yield None.

    Returns:
        ``(images, videos)``.
    """
    images: list[Any] = []
    videos: list[Any] = []
    for message in normalize_messages(messages):
        for part in message["content"]:
            if part["type"] == "image":
                images.append(part.get("image"))
            elif part["type"] == "video":
                videos.append(part.get("video", part.get("path")))
    return images, videos
