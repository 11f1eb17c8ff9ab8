"""Checks of model inputs, shared by ``forward``, ``generate`` and the processors.

Every check here runs in one place for every entry point: the models call them from
:class:`~visorlib.models.base.VisionLanguageModel` (``generate`` goes through ``forward``), the
processors from :func:`~visorlib.processing.image.to_chw_tensor`. A failed check raises
:class:`InputError` with a message that names the argument and the sample or image, never a
bare torch error.

Cost: the checks that read tensor values are one reduction per tensor, and those of one forward
share a single host synchronisation (see :func:`flags`), so a decode step pays one small
reduction over its ``[B, 1]`` ids and ``[B, 1, D]`` embeddings and nothing per layer.

This module is a leaf (it imports only torch and :mod:`visorlib.config`), so the processors can
use it without importing the models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import ConfigError


class InputError(ValueError):
    """Model or processor inputs are inconsistent (shapes, values, placeholder counts, missing tensors)."""


class LayerChoiceError(InputError, ConfigError):
    """A bad ``sa_layers`` configuration.

    An input error when it comes from a call (``forward``, ``generate``, ``flops``) and a config
    error when it comes from a card (``visor.default``, ``visor.configurations``): catchable as either.
    """


def require_tensor(value: object, name: str, hint: str = "build the inputs with visorlib.processor_for(model)"):
    """``value`` if it is a ``torch.Tensor``, else an :class:`InputError` naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}; {hint}")
    return value


def flags(*conditions: torch.Tensor) -> list[bool]:
    """Several 0-d bool tensors (e.g. ``x.any()``) read back in one host synchronisation (one ``.tolist()``)."""
    return [bool(c) for c in torch.stack(conditions).tolist()]


def nonfinite(tensor: torch.Tensor) -> torch.Tensor:
    """0-d bool: does ``tensor`` hold a NaN or an infinity (one reduction; False for integers)."""
    if not tensor.is_floating_point():
        return torch.zeros((), dtype=torch.bool, device=tensor.device)
    return ~torch.isfinite(tensor).all()


def first_nonfinite_row(tensor: torch.Tensor) -> int:
    """Index along dim 0 of the first row holding a NaN or an infinity (error path only)."""
    rows = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(1)
    return int(rows.nonzero()[0, 0])


def check_finite(tensor: torch.Tensor, name: str, rows: str | Callable[[int], str] = "") -> None:
    """Refuse NaN or infinite values in ``tensor`` (a float), naming the first offending row.

    Args:
        tensor: The values to check.
        name: The argument, for the message (``"pixel_values"``).
        rows: What dim 0 counts (``"image"``), or a function naming row ``i`` (``"patch 7 of image 1"``);
            when given the message names the first bad row.
    """
    if not bool(nonfinite(tensor)):
        return
    where = ""
    if rows and tensor.dim():
        row = first_nonfinite_row(tensor)
        where = f" ({rows(row) if callable(rows) else f'{rows} {row}'})"
    raise InputError(f"{name} holds NaN or infinite values{where}; the model would return NaN logits")


def token_id_error(input_ids: torch.Tensor, ignore: torch.Tensor, vocab_size: int) -> InputError:
    """The :class:`InputError` for ids outside ``0..vocab_size-1`` (error path of :func:`safe_token_ids`)."""
    bad = ((input_ids < 0) | (input_ids >= vocab_size)) & ~ignore
    row, col = (int(i) for i in bad.nonzero()[0])
    value = int(input_ids[row, col])
    return InputError(f"input_ids[{row}] holds id {value} (position {col}) outside the vocabulary "
                      f"(0..{vocab_size - 1})")


def safe_token_ids(input_ids: torch.Tensor, ignore: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids safe to look up, and a 0-d bool: was any id outside the vocabulary (two cheap ops).

    ``ignore`` marks placeholder ids (image, video, routing), which the model overwrites and which
    may lie outside a shrunk vocabulary: they are looked up as id 0. The clamp keeps a bad id from
    reaching the embedding lookup (a device-side assert on CUDA) until the flag is read.
    """
    ids = input_ids.masked_fill(ignore, 0)
    safe = ids.clamp(0, vocab_size - 1)
    return safe, (safe != ids).any()


def check_token_ids(input_ids: object) -> torch.Tensor:
    """``input_ids`` if it is an integer ``[batch, length]`` tensor, else an :class:`InputError`."""
    require_tensor(input_ids, "input_ids")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, length], got {list(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    return input_ids


def check_attention_mask(attention_mask: object, batch: int, total: int, prefill: bool) -> torch.Tensor:
    """``attention_mask`` if it is a ``[batch, total]`` tensor with a real token in every row.

    Args:
        attention_mask: The mask (0 = padding).
        batch: Rows of ``input_ids``.
        total: Cached plus new tokens.
        prefill: Check the rows for "all padding" (a row with no real token has nothing to attend
            to: its softmax would be 0/0). Decode steps skip it: their new token is real.
    """
    require_tensor(attention_mask, "attention_mask")
    if attention_mask.shape != (batch, total):
        raise InputError(
            f"attention_mask must be [{batch}, {total}] (cached + new tokens), got {list(attention_mask.shape)}"
        )
    if prefill:
        empty = (attention_mask == 0).all(1)
        if bool(empty.any()):
            rows = empty.nonzero()[:, 0].tolist()
            raise InputError(f"attention_mask rows {rows} are all padding (0): every sample needs at least one "
                             "real token")
    return attention_mask


def check_media_per_sample(
    tokens_per_sample: Sequence[int],
    item_lengths: Sequence[int],
    kind: str,
    groups: Sequence[int] | None = None,
    first_index: int = 0,
) -> None:
    """Each sample's placeholder tokens against the features of its *own* images (or videos).

    Images are given in prompt order across the batch, so the images of sample ``b`` are the ones
    that follow those of samples ``0..b-1``. Matching only the batch total would let two samples
    trade features (e.g. swapped ``image_sizes``) without an error.

    Args:
        tokens_per_sample: Placeholder tokens of this kind in each row of ``input_ids``.
        item_lengths: Features of each image / video, in order.
        kind: ``"image"`` or ``"video"`` (for messages).
        groups: Images of each sample that has any (``batch_num_images``), when known; otherwise
            a sample takes the next images until its token count is reached.
        first_index: Offset of the first item in messages.

    Raises:
        InputError: A sample whose token count differs from its images' features, naming it.
    """
    group_iter = iter(groups) if groups is not None else None
    with_media = [i for i, n in enumerate(tokens_per_sample) if n]
    if groups is not None and len(groups) != len(with_media):
        raise InputError(f"batch_num_images has {len(groups)} entries but {len(with_media)} samples of input_ids "
                         f"contain {kind} tokens (samples {with_media})")
    start = 0
    for sample, tokens in enumerate(tokens_per_sample):
        if not tokens:
            continue
        if group_iter is not None:
            stop = start + int(next(group_iter))
        else:  # take images until the sample's tokens are covered (or overshot)
            stop, covered = start, 0
            while stop < len(item_lengths) and covered < tokens:
                covered += item_lengths[stop]
                stop += 1
        own = item_lengths[start:stop]
        if sum(own) != tokens:
            names = ", ".join(str(first_index + i) for i in range(start, stop)) or "none"
            raise InputError(
                f"sample {sample} of input_ids holds {tokens} {kind} tokens but its {kind}s ({kind} {names}) produce "
                f"{sum(own)} features ({list(own)}); each sample's placeholders must match its own {kind}s "
                f"(check image_sizes / grids and their order)"
            )
        start = stop
