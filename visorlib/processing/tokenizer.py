"""A thin tokenizer over the Rust ``tokenizers`` library, reading a Hugging Face ``tokenizer.json``.

transformers' "fast" tokenizers are this same Rust object plus configuration; for the Qwen2
tokenizer of LLaVA-OneVision the configuration that matters is small (no BOS is added - Qwen's
``tokenizer.json`` has no template post-processor - and no clean-up of spaces on decode), so we
wrap the Rust tokenizer directly and get the same ids without depending on transformers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from ..hub import CheckpointError, looks_local, read_json

# Qwen2 / LLaVA-OneVision conventions, used when no tokenizer_config.json says otherwise.
DEFAULT_EOS_TOKEN = "<|im_end|>"
DEFAULT_PAD_TOKEN = "<|endoftext|>"


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken-style dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints, a 1-D tensor or a 1-D numpy array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer:
    """Text <-> token ids for a Hugging Face ``tokenizer.json``.

    Args:
        backend: A loaded ``tokenizers.Tokenizer``.
        eos_token: End-of-turn token text. None picks ``"<|im_end|>"`` (Qwen2 chat) when the
            vocabulary has it.
        pad_token: Padding token text. None picks ``"<|endoftext|>"`` (Qwen2) when present.

    Raises:
        ValueError: An explicitly given ``eos_token`` or ``pad_token`` is not in the vocabulary.
    """

    def __init__(self, backend: RustTokenizer, eos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        for name, token in (("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self.eos_token = eos_token or self._if_known(DEFAULT_EOS_TOKEN)
        self.pad_token = pad_token or self._if_known(DEFAULT_PAD_TOKEN)

    def _if_known(self, token: str) -> str | None:
        return token if self.backend.token_to_id(token) is not None else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load ``tokenizer.json`` from a path.

        Args:
            path: The ``tokenizer.json`` file.
            **kwargs: ``eos_token`` / ``pad_token`` overrides.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            backend = RustTokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception for any parse error
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {err}") from err
        return cls(backend, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | os.PathLike, revision: str | None = None, local_files_only: bool = False, **kwargs: Any
    ) -> Tokenizer:
        """Load from a local directory or a Hugging Face Hub repository.

        ``tokenizer.json`` is required. ``tokenizer_config.json``, when present, supplies the
        EOS and pad tokens. Hub downloads go through ``huggingface_hub``, so its cache and the
        ``HF_HUB_OFFLINE`` / ``HF_HOME`` environment variables apply.

        Args:
            path_or_hub_id: A directory holding ``tokenizer.json``, a path to the file itself, or
                a Hub repository id such as ``"llava-hf/llava-onevision-qwen2-0.5b-ov-hf"``.
            revision: Hub revision (branch, tag or commit).
            local_files_only: For a Hub id, read the Hub cache only (no network).
            **kwargs: ``eos_token`` / ``pad_token`` overrides (win over tokenizer_config.json).
        """
        local = Path(path_or_hub_id)
        if local.is_file():
            return cls.from_file(local, **kwargs)
        if local.is_dir():
            tokenizer_file = local / "tokenizer.json"
            if not tokenizer_file.is_file():
                raise FileNotFoundError(f"directory {local} has no tokenizer.json")
            config_file: Path | None = local / "tokenizer_config.json"
        elif looks_local(path_or_hub_id):
            # Not a Hub id "owner/name", so the user meant a local path that is missing.
            raise FileNotFoundError(
                f"no tokenizer file or folder at {os.fspath(path_or_hub_id)!r} (looked in {local.expanduser().absolute()})"
            )
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            repo = str(path_or_hub_id)
            offline = {"local_files_only": True} if local_files_only else {}
            tokenizer_file = Path(hf_hub_download(repo, "tokenizer.json", revision=revision, **offline))
            try:
                config_file = Path(hf_hub_download(repo, "tokenizer_config.json", revision=revision, **offline))
            except (OSError, EntryNotFoundError):
                # The config is optional: without it the Qwen2 defaults below are used.
                config_file = None
        settings = {}
        if config_file is not None and config_file.is_file():
            config = read_json(config_file)
            for key in ("eos_token", "pad_token"):
                token = _token_text(config.get(key))
                if token is not None:
                    settings[key] = token
        settings.update(kwargs)
        return cls.from_file(tokenizer_file, **settings)

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token text of ``token_id``, or None when out of range."""
        return self.backend.id_to_token(int(token_id))

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-turn token (``<|im_end|>`` for Qwen2 chat)."""
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id used to pad batches (``<|endoftext|>`` for Qwen2)."""
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def special_tokens(self) -> list[str]:
        """Texts of the added tokens marked special (those ``skip_special_tokens`` drops)."""
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    # -- encode / decode --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        Special tokens written in the text (``<|im_start|>``, ``<image>``...) become their ids.
        ``add_special_tokens`` runs the tokenizer's own post-processor, as transformers does by
        default; Qwen2's adds nothing, so no BOS appears.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for several texts (in parallel in the Rust backend)."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"encode_batch expects strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, 1-D tensor or array).

        Args:
            ids: Token ids.
            skip_special_tokens: Drop special tokens (``<|im_end|>``, ``<image>``...) from the text.
        """
        return self.backend.decode(_ids_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` for each row of ``sequences`` (a list of lists or a 2-D tensor)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r})"
