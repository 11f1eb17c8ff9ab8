"""Autoregressive generation with a key/value cache.

One prefill pass over the prompt (vision included) fills the cache; each decode step then feeds
only the newest token. Greedy decoding is the default; sampling supports temperature, top-k and
top-p in Hugging Face's order (temperature, then top-k, then top-p), so seeded runs are comparable.
Batches are left-padded: positions count real tokens only, so padding never shifts a prompt.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .validation import InputError


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Apply temperature, top-k and nucleus (top-p) filtering to ``logits [B, V]``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; always keep the best.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _nonfinite_logits(logits: torch.Tensor, step: int) -> FloatingPointError:
    """The error for NaN / infinite logits at generation ``step`` (error path only)."""
    rows = (~torch.isfinite(logits).all(-1)).nonzero()[:, 0].tolist()
    return FloatingPointError(
        f"generate: the logits of samples {rows} are NaN or infinite at new token {step} although the inputs are "
        "finite; the weights hold NaN/Inf or the dtype overflowed (try float32 or bfloat16)"
    )


class GenerationMixin:
    """Adds :meth:`generate` to a model with ``forward(..., cache=, logits_to_keep=)`` and ``new_cache()``."""

    def suppressed_token_ids(self, vocab_size: int) -> list[int]:
        """Ids the model may read but must never write (the router's routing token; the image/video
        placeholders, which a decode step would reject for lack of pixels), within ``vocab_size``."""
        tokens_cfg = self.cfg.tokens
        suppressed = [self.cfg.visor.routing_token_id] if self.cfg.visor is not None and self.cfg.visor.router else []
        suppressed += [tokens_cfg.image_token_id, tokens_cfg.video_token_id]
        return [i for i in suppressed if i < vocab_size]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        sa_layers: object = None,
        **vision_inputs,
    ) -> torch.Tensor:
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        Args:
            input_ids: ``[B, L]`` left-padded prompts (placeholders expanded).
            attention_mask: ``[B, L]``, 0 on padding.
            max_new_tokens: Upper bound on generated tokens.
            do_sample: Sample instead of taking the argmax.
            temperature: Softmax temperature when sampling.
            top_k: Keep only the k most likely tokens when sampling (0 = off).
            top_p: Nucleus sampling mass (1.0 = off).
            eos_token_id: Token(s) that end a sequence; default from the model card.
            pad_token_id: Written after a sequence has ended; default from the model card.
            generator: RNG for reproducible sampling.
            sa_layers: Layer configuration used for prefill and every decode step.
            **vision_inputs: ``pixel_values``, ``image_sizes``, ``pixel_values_videos``, ... (prefill only).

        Returns:
            ``[B, L + n]``: the prompts followed by the generated tokens.
        """
        # A float (1.5) or bool would reach range() and fail there as a bare TypeError.
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        tokens_cfg = self.cfg.tokens
        eos = tokens_cfg.eos_token_ids if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = tokens_cfg.pad_token_id if pad_token_id is None else pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.new_cache()
        logits = self(
            input_ids, attention_mask, cache=cache, logits_to_keep=1, sa_layers=sa_layers, **vision_inputs
        ).logits[:, -1]
        suppressed = self.suppressed_token_ids(logits.shape[-1])
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = []
        for _ in range(max_new_tokens):
            # NaN logits would argmax to token 0 silently. Inputs are checked by forward; this catches
            # what goes wrong inside (NaN weights, a half-precision overflow). Read back with the
            # end-of-sequence test below: no extra host sync per step.
            broken = ~torch.isfinite(logits).all()
            if suppressed:
                logits = logits.index_fill(-1, torch.tensor(suppressed, device=logits.device), float("-inf"))
            if do_sample:
                if bool(broken):  # multinomial would fail on NaN with a bare torch error
                    raise _nonfinite_logits(logits, len(generated))
                probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
                step = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                step = logits.argmax(-1)
            step = step.masked_fill(finished, pad)
            generated.append(step)
            finished |= torch.isin(step, eos)
            done, broken = (bool(x) for x in torch.stack([finished.all(), broken]).tolist())
            if broken:
                raise _nonfinite_logits(logits, len(generated) - 1)
            if done or len(generated) == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(step)[:, None]], dim=1)
            logits = self(step[:, None], attention_mask, cache=cache, sa_layers=sa_layers).logits[:, -1]
        return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
