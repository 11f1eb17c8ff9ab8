"""The chat prompt format of the ``llava-hf/llava-onevision-*`` checkpoints (Qwen2 ChatML variant).

This reproduces, in plain Python, the Jinja template those checkpoints ship in
``chat_template.json`` (the same string transformers' own LLaVA-OneVision processor tests use;
the hub processor renders ``"<|im_start|>user <image>\\nWhat is shown in this image?<|im_end|>
<|im_start|>assistant\\n"`` for one image and one question). Per message it writes::

    <|im_start|>{role} {"<image>" per image part}{"<video>" per video part}{"\\n" + text per text part}<|im_end|>

and, with ``add_generation_prompt``, ``<|im_start|>assistant\\n`` at the end. Note what it does
*not* do, unlike the original LLaVA-OneVision (lmms-lab) ``qwen_1_5`` conversation: it injects no
default system prompt ("You are a helpful assistant."), puts a space (not a newline) after the
role, and writes no newline after ``<|im_end|>``. We match the Hugging Face template because the
hf checkpoints and their processor are what users compare against; pass a ``system`` message to
get a system turn (it is rendered like any other role).

Within one message the template renders all images first, then all videos, then all texts,
whatever their order in ``content``; we keep that.

Two deliberate differences from rendering the Jinja template with transformers:

* ``content`` given as a plain string is treated as one text part. The Jinja template iterates
  the string's characters looking for ``type`` keys and so silently drops the text.
* Parts of an unknown ``type`` raise ``ValueError`` instead of being silently skipped, and a
  bare string inside a ``content`` list is taken as a text part.

:func:`apply_qwen2_vl_chat_template` renders the Qwen2-VL checkpoints' format from the same
message structure (same parsing and the same two differences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# "image_url" is OpenAI's spelling; transformers rewrites it to "image" before templating.
_IMAGE_TYPES = ("image", "image_url")
_VIDEO_TYPES = ("video",)
_TEXT_TYPES = ("text",)


def _parts(message: Mapping[str, Any], index: int) -> list[Mapping[str, Any]]:
    """The content parts of one message, with string content turned into a text part."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise ValueError(f"message {index}: content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for position, part in enumerate(content):
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, Mapping) or "type" not in part:
            raise ValueError(f"message {index}, part {position}: expected a dict with a 'type' key, got {part!r}")
        kind = part["type"]
        if kind not in _IMAGE_TYPES + _VIDEO_TYPES + _TEXT_TYPES:
            raise ValueError(
                f"message {index}, part {position}: unknown type {kind!r} (expected 'image', 'video' or 'text')"
            )
        if kind in _TEXT_TYPES and not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}, part {position}: a text part needs a string 'text'")
        parts.append(part)
    return parts


def _check_messages(messages: Any) -> list[Mapping[str, Any]]:
    if isinstance(messages, Mapping):
        messages = [messages]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} must be a dict with a string 'role', got {message!r}")
    return list(messages)


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation into the llava-onevision-hf prompt string.

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
    pieces = []
    for index, message in enumerate(_check_messages(messages)):
        parts = _parts(message, index)
        images = sum(part["type"] in _IMAGE_TYPES for part in parts)
        videos = sum(part["type"] in _VIDEO_TYPES for part in parts)
        texts = "".join("\n" + part["text"] for part in parts if part["type"] in _TEXT_TYPES)
        pieces.append(f"{IM_START}{message['role']} {IMAGE_TOKEN * images}{VIDEO_TOKEN * videos}{texts}{IM_END}")
    if add_generation_prompt:
        pieces.append(f"{IM_START}assistant\n")
    return "".join(pieces)


QWEN2_VL_SYSTEM = "You are a helpful assistant."


def apply_qwen2_vl_chat_template(
    messages: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
) -> str:
    """Render a conversation into the prompt format of the ``Qwen/Qwen2-VL-*`` checkpoints.

    The Hub template (``chat_template.json``), in plain Python: a default system turn
    (``"You are a helpful assistant."``) unless the first message is a system message; then per
    message ``<|im_start|>{role}\n{parts}<|im_end|>\n``, the parts in their order, each image as
    ``<|vision_start|><|image_pad|><|vision_end|>`` and each video with ``<|video_pad|>``.

    Args:
        messages: As for :func:`apply_chat_template`.
        add_generation_prompt: End with ``<|im_start|>assistant\n`` so the model answers next.
        add_vision_id: Prefix each image with ``Picture N: `` and each video with ``Video N: ``.

    Returns:
        The prompt, with one ``<|image_pad|>`` / ``<|video_pad|>`` per image / video (the
        processor expands each into the right number of visual tokens).
    """
    pieces, seen = [], {"Picture": 0, "Video": 0}
    for index, message in enumerate(_check_messages(messages)):
        if index == 0 and message["role"] != "system":
            pieces.append(f"{IM_START}system\n{QWEN2_VL_SYSTEM}{IM_END}\n")
        body = []
        for part in _parts(message, index):
            if part["type"] in _TEXT_TYPES:
                body.append(part["text"])
                continue
            label, pad = ("Picture", "<|image_pad|>") if part["type"] in _IMAGE_TYPES else ("Video", "<|video_pad|>")
            seen[label] += 1
            body.append((f"{label} {seen[label]}: " if add_vision_id else "") + f"<|vision_start|>{pad}<|vision_end|>")
        pieces.append(f"{IM_START}{message['role']}\n{''.join(body)}{IM_END}\n")
    if add_generation_prompt:
        pieces.append(f"{IM_START}assistant\n")
    return "".join(pieces)


def media_in_messages(messages: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """Images and videos embedded in the parts, in prompt order (``{"type": "image", "image": obj}``).

    The order follows the rendered prompt (per message: images, then videos), so the i-th image
    returned fills the i-th ``<image>`` placeholder. Parts without an embedded object yield None.

    Returns:
        ``(images, videos)``.
    """
    images: list[Any] = []
    videos: list[Any] = []
    for index, message in enumerate(_check_messages(messages)):
        for part in _parts(message, index):
            if part["type"] in _IMAGE_TYPES:
                images.append(part.get("image"))
            elif part["type"] in _VIDEO_TYPES:
                videos.append(part.get("video"))
    return images, videos
