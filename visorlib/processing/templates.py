"""Chat templates: the checkpoint's own Jinja template, rendered in a sandbox as transformers renders it.

A checkpoint says how its prompts look in a Jinja template: ``chat_template.jinja``, or the
``chat_template`` key of ``chat_template.json`` / ``tokenizer_config.json`` (:func:`load_chat_template`;
:func:`visorlib.hub.resolve_checkpoint` downloads these files with the weights). A fine-tuned
checkpoint whose template differs therefore gets its own prompt format, not a hand-written copy of
the base model's. A card without a checkpoint template uses its built-in one
(``tokens.chat_template`` names it in :data:`BUILTIN_TEMPLATES`: the Hub templates of the
``llava-hf/llava-onevision-*`` and ``Qwen/Qwen2-VL-*`` checkpoints, verbatim).

Rendering follows transformers' ``render_jinja_template``: an ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}``
block (rendered as its body), ``raise_exception``, ``strftime_now`` and a ``tojson`` filter. A
template is code from the checkpoint's author, so the sandbox is strict: no attribute starting
with ``_`` (``__class__``, ``__globals__``...), no mutation of the values passed in, no file access
(there is no loader, so ``{% include %}`` / ``{% import %}`` fail). Where jinja2's sandbox would
render an unsafe attribute as an empty string, this one refuses at once, with a
:class:`ChatTemplateError` naming the template and the attribute.

Messages are checked and normalised first (:func:`normalize_messages`): ``content`` given as a
plain string becomes one text part (several Hub templates iterate the content and would drop a
string silently), and a part of an unknown ``type`` is an error rather than being skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# chat_template.json of llava-hf/llava-onevision-qwen2-*-ov-hf (the string transformers' own
# LLaVA-OneVision processor tests check against the hub processor), verbatim.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

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

#: The built-in template of each ``tokens.chat_template`` name a card may give.
BUILTIN_TEMPLATES = {"qwen2": LLAVA_ONEVISION_TEMPLATE, "qwen2_vl": QWEN2_VL_TEMPLATE}

# "image_url" is OpenAI's spelling; transformers rewrites it to "image" before templating.
_PART_TYPES = ("image", "image_url", "video", "text")


class ChatTemplateError(ValueError):
    """A chat template that cannot be read, is refused by the sandbox, or fails to render (names it)."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, but an unsafe attribute is an error where it is read (jinja2
    returns an undefined value that prints as an empty string until something uses it)."""

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed")


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compiled(template: str):
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` checked, with string content as one text part and bare strings as text parts.

    Raises:
        ValueError: Not a non-empty list of ``{"role": str, "content": ...}``; a part without a
            ``type``, of an unknown type, or a text part without a string ``text`` (naming the
            message and part).
    """
    if isinstance(messages, Mapping):
        messages = [messages]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} must be a dict with a string 'role', got {message!r}")
        content = message.get("content")
        if content is None:
            content = []
        elif isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, Sequence):
            raise ValueError(f"message {index}: content must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for position, part in enumerate(content):
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, Mapping) or "type" not in part:
                raise ValueError(f"message {index}, part {position}: expected a dict with a 'type' key, got {part!r}")
            if part["type"] not in _PART_TYPES:
                raise ValueError(f"message {index}, part {position}: unknown type {part['type']!r} "
                                 "(expected 'image', 'video' or 'text')")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"message {index}, part {position}: a text part needs a string 'text'")
            part = dict(part)
            if part["type"] == "image_url":
                part["type"] = "image"
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def render_chat_template(template: str, messages: Any, add_generation_prompt: bool = True,
                         source: str = "the chat template", **variables: Any) -> str:
    """Render ``messages`` with the Jinja ``template`` in the sandbox.

    Args:
        template: The template source.
        messages: The conversation (see :func:`normalize_messages`).
        add_generation_prompt: End with the assistant turn's header so the model answers next.
        source: Where the template came from, for error messages (a file name or card name).
        **variables: More template variables (``add_vision_id``, ``eos_token``, ...).

    Raises:
        ChatTemplateError: The sandbox refused the template (attribute walking such as
            ``__class__``), it reached for a file, it called ``raise_exception``, or it is not
            valid Jinja.
    """
    messages = normalize_messages(messages)
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except SecurityError as err:
        raise ChatTemplateError(f"{source} was refused by the sandbox: {err}") from err
    except TemplateError as err:
        raise ChatTemplateError(f"{source} failed to render: {type(err).__name__}: {err}") from err
    except TypeError as err:  # e.g. "no loader for this environment specified" ({% include %})
        raise ChatTemplateError(f"{source} failed to render: {err}") from err


def builtin_template(name: str) -> str:
    """The built-in template a card names (``tokens.chat_template``)."""
    if name not in BUILTIN_TEMPLATES:
        raise ChatTemplateError(f"chat_template {name!r} is not a built-in template "
                                f"(known: {', '.join(sorted(BUILTIN_TEMPLATES))})")
    return BUILTIN_TEMPLATES[name]


def load_chat_template(folder: str | os.PathLike) -> tuple[str, str] | None:
    """``(template, file name)`` of a checkpoint folder, or None when it has none.

    Looked up, as transformers does: ``chat_template.jinja``; the ``chat_template`` key of
    ``chat_template.json``; then of ``tokenizer_config.json`` (a list of named templates gives
    its ``default``).

    Raises:
        ChatTemplateError: A template file that cannot be read or holds no string template.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), str(jinja)
        except (OSError, UnicodeDecodeError) as err:
            raise ChatTemplateError(f"{jinja}: cannot be read: {err}") from err
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise ChatTemplateError(f"{path}: cannot read its chat_template: {err}") from err
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            value = next((t.get("template") for t in value if isinstance(t, Mapping) and t.get("name") == "default"),
                         None)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ChatTemplateError(f"{path}: chat_template must be a string, got {type(value).__name__}")
        return value, str(path)
    return None
