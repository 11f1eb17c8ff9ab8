"""What every Hugging Face -> visorlib converter needs: a key renamer, an option check, the Qwen2 reader.

A family's ``convert.py`` keeps only what that family knows (its key tables, its config fields,
its tensor reshapes); the mechanics live here, once:

* :func:`rename_keys` applies an ordered table of ``(pattern, replacement)`` regex rules to every
  key of a state dict and refuses keys no rule knows, so a checkpoint of another layout fails
  with its own key names instead of as a wall of "missing keys" from the strict loader;
* :func:`require_value` refuses a config option visorlib does not implement, naming the file and
  the key (:func:`check_rope_types` is that check for the rotary-scaling spellings);
* :func:`qwen2_decoder_config` reads a Qwen2 language model from any of the config layouts the
  families ship (nested ``text_config`` or flat, ``rope_parameters`` or ``rope_scaling``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from ..config import ConfigError, DecoderConfig
from ..hub import CheckpointError

# A tied LM head is the embedding matrix: a stored copy is dropped (as transformers does), not loaded.
TIED_LM_HEAD = r"^decoder\.lm_head\.weight$"


def rename_keys(
    state: Mapping[str, torch.Tensor],
    rules: Sequence[tuple[str, str]],
    *,
    ignored: Sequence[str] = (),
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename every key of ``state`` by an ordered regex table.

    Each rule is a ``(pattern, replacement)`` pair for :func:`re.sub`, applied to the key as the
    earlier rules left it, so a first rule can fold one layout into another that later rules map
    (transformers' in-memory names into its on-disk ones, say). Tensors are kept as they are (the
    same objects), so callers can still tell which file each came from.

    Args:
        state: The checkpoint's tensors.
        rules: ``(pattern, replacement)`` pairs, applied in order. A rule whose replacement equals
            what it matched (``(r"^image_newline$", "image_newline")``) keeps a key as it is.
        ignored: Patterns (matched at the start of the *renamed* key) of tensors to drop: parts of
            the checkpoint the model does not compute with.
        source: What is being converted, named in errors.

    Returns:
        The renamed tensors.

    Raises:
        CheckpointError: naming the keys no rule matches (and no ``ignored`` pattern covers), or two
            keys that rename to the same name.
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    drop = [re.compile(pattern) for pattern in ignored]
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in state.items():
        new, matched = key, False
        for pattern, repl in compiled:
            new, count = pattern.subn(repl, new)
            matched = matched or count > 0
        if any(pattern.match(new) for pattern in drop):
            continue
        if not matched:
            unknown.append(key)
        elif new in origin:
            raise CheckpointError(f"{source}: keys {origin[new]!r} and {key!r} both map to {new!r}")
        else:
            out[new], origin[new] = value, key
    if unknown:
        unknown.sort()
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"{source}: unrecognised keys {unknown[:5]}{more} (no rule of the key map matches them: "
            "a layout visorlib does not read?)"
        )
    return out


def _alternatives(allowed: Collection[Any]) -> str:
    names = [repr(value) for value in allowed]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def require_value(source: str, key: str, value: Any, allowed: Collection[Any]) -> None:
    """Refuse a config option visorlib does not implement.

    Args:
        source: The config file, named first in the message.
        key: The option as the file spells it (``"text_config.hidden_act"``).
        value: Its value in the file (after the caller applied transformers' default).
        allowed: The values visorlib implements.

    Raises:
        ConfigError: ``"<source>: <key> <value> is not supported (visorlib supports <allowed>)"``.
    """
    if value not in allowed:
        raise ConfigError(f"{source}: {key} {value!r} is not supported (visorlib supports {_alternatives(allowed)})")


def check_rope_types(source: str, text: Mapping[str, Any], allowed: tuple[str, ...], prefix: str = "text_config.") -> None:
    """Refuse rotary scaling visorlib does not implement, wherever the config spells it.

    transformers 5 writes ``rope_parameters: {rope_type: ...}``; older files write
    ``rope_scaling: {type: ...}`` (or ``rope_type``), and transformers still honours those, so a
    ``rope_scaling: {type: yarn}`` read as plain RoPE would be a silently different model.

    Args:
        source: The config file, named in errors.
        text: The (sub-)config holding the rotary settings.
        allowed: The rope types visorlib implements here (``"default"``, ``"mrope"``).
        prefix: Where ``text`` sits in the file, for the message (``""`` for the top level).
    """
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{source}: {prefix}{key} must be a mapping or null, got {rope!r}")
        require_value(source, f"{prefix}{key} type", rope.get("rope_type", rope.get("type", "default")), allowed)


def qwen2_decoder_config(
    hf: Mapping[str, Any], source: str, defaults: Mapping[str, Any], *, mrope: bool = False
) -> DecoderConfig:
    """A :class:`DecoderConfig` from the Qwen2 language-model fields of a Hugging Face config.

    The fields sit in ``text_config`` (transformers 5, multimodal configs) or at the top level
    (flat files: Qwen2-VL's Hub configs, Apple's FastVLM, a plain Qwen2 ``config.json``); the
    rotary settings in ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x, which may
    also put it at the top level next to a ``text_config``). Values in the rope mapping win over
    a separate ``rope_theta``, as in transformers.

    Args:
        hf: The whole ``config.json`` (or a flat Qwen2 config).
        source: The file, named in errors.
        defaults: Values for keys the file omits, by Hugging Face name (``vocab_size``,
            ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``rope_theta``, ``rms_norm_eps``, ``max_position_embeddings`` and, with ``mrope``,
            ``mrope_section``); a missing ``num_key_value_heads`` means one KV head per query head.
        mrope: Read multimodal rotary positions (``mrope_section``): Qwen2-VL's decoder.

    Raises:
        ConfigError: for rotary scaling, sliding-window attention, activations or head sizes
            visorlib does not implement (named with the file and key).
    """
    text = hf.get("text_config") or hf
    prefix = "" if text is hf else "text_config."
    allowed = ("default", "mrope") if mrope else ("default",)
    check_rope_types(source, text, allowed, prefix)
    if text is not hf:  # transformers 4.x honours a top-level rope_scaling too
        check_rope_types(source, hf, allowed, "")
    ropes = [text.get("rope_parameters"), text.get("rope_scaling"), hf.get("rope_scaling")]
    rope = next((r for r in ropes if r and "mrope_section" in r), None) if mrope else None
    rope = rope or next((r for r in ropes if r), {})
    require_value(source, f"{prefix}use_sliding_window", bool(text.get("use_sliding_window", False)), (False,))
    require_value(source, f"{prefix}hidden_act", text.get("hidden_act", "silu"), ("silu",))

    def get(key: str) -> Any:
        return text.get(key, defaults[key])

    heads, hidden = get("num_attention_heads"), get("hidden_size")
    if text.get("head_dim", hidden // heads) != hidden // heads:
        raise ConfigError(f"{source}: {prefix}head_dim must equal hidden_size / num_attention_heads")
    extra = {"mrope_section": list(rope.get("mrope_section", defaults["mrope_section"]))} if mrope else {}
    return DecoderConfig(
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        rope_theta=float(rope.get("rope_theta", get("rope_theta"))),
        rms_norm_eps=float(get("rms_norm_eps")),
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        **extra,
    )
