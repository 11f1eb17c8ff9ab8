"""Attention scores for token reduction, computed without the full attention matrix.

Token-reduction rules need a few numbers out of attention (how much a visual token is attended
to), not the attention matrix. Their public code asks the model for ``output_attentions=True``,
which turns SDPA / flash-attention off for *every* layer and materialises ``[N, H, T, T]`` per
layer. Here the model's own attention keeps running through SDPA; the scores are recomputed on
the side from the chosen layer's queries and keys only:

- :func:`received_attention`: the mean attention each token receives from all queries (the
  "CLS attention" of a tower without a CLS token, as the VISOR paper's appendix L defines it),
  as a blocked column mean of ``softmax(q k^T / sqrt(d))``: queries in chunks, a running sum, so
  memory is ``[N, H, chunk, T]`` instead of ``[N, H, T, T]``;
- :func:`query_attention`: the attention a few chosen text queries pay to every key of a decoder
  layer (GQA-aware, causal and padding masks applied, softmax over the whole key set), read at
  the visual keys;
- :class:`TowerAttentionCapture`: forward hooks that copy a timm ViT block's q and k as that
  block computes them (the tower itself is not modified and keeps SDPA).

Both scores are exact up to float summation order: the tests compare them with the materialised
eager matrix at an absolute tolerance of 1e-6 (float32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .spec import ReductionSpecError


def received_attention(q: torch.Tensor, k: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Mean attention each token receives: ``softmax(q k^T / sqrt(d))`` averaged over heads and queries.

    Args:
        q: ``[N, H, T, d]`` queries of one attention layer (N tiles).
        k: ``[N, H, T, d]`` keys of the same layer.
        chunk: Queries per block; peak extra memory is ``N * H * chunk * T`` floats.

    Returns:
        ``[N, T]`` float32; each row sums to 1 (every query's softmax row sums to 1).
    """
    n, h, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    total = torch.zeros(n, t, dtype=torch.float32, device=q.device)
    kt = k.transpose(-1, -2).float()
    for start in range(0, t, chunk):
        logits = (q[:, :, start:start + chunk].float() @ kt) * scale          # [N, H, c, T]
        total += torch.softmax(logits, dim=-1).sum(dim=(1, 2))
    return total / (h * t)


def query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    visual_index: torch.Tensor,
    visual_valid: torch.Tensor,
    causal: bool = True,
) -> torch.Tensor:
    """Attention chosen queries pay to the visual keys of one decoder layer, mean over heads and queries.

    Only ``[B, Hq, Q, L]`` logits are formed (Q is a handful of text tokens), never ``[L, L]``.

    Args:
        q: ``[B, Hq, Q, d]`` queries (rotary already applied) of the chosen text tokens.
        k: ``[B, Hkv, L, d]`` keys of the whole sequence; ``Hq`` a multiple of ``Hkv`` (grouped
            queries: each kv head serves ``Hq / Hkv`` query heads, as in the model).
        query_positions: ``[B, Q]`` index in ``0..L-1`` of each query token (for the causal mask).
        key_valid: ``[B, L]`` bool, False at padding.
        visual_index: ``[B, V]`` long, index in ``0..L-1`` of each visual token (padded rows any value).
        visual_valid: ``[B, V]`` bool, False at padded visual slots.
        causal: A query sees keys at or before its own position (the decoder's mask).

    Returns:
        ``[B, V]`` float32 scores; padded visual slots are ``-inf``.
    """
    b, hq, nq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ReductionSpecError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    groups = hq // hkv
    # Query head h reads kv head h // groups (the model's repeat_interleave): folding each group of
    # query heads into the query axis lets one matmul per kv head serve them, without copying k.
    qg = q.float().reshape(b, hkv, groups * nq, d)
    logits = (qg @ k.float().transpose(-1, -2)) / math.sqrt(d)                # [B, Hkv, G*Q, L]
    allowed = key_valid.bool()[:, None, :].expand(b, nq, length)
    if causal:
        pos = torch.arange(length, device=k.device)
        allowed = allowed & (pos[None, None, :] <= query_positions[:, :, None])
    logits = logits.masked_fill(~allowed.repeat(1, groups, 1)[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=(1, 2))                   # [B, L]
    scores = probs.gather(1, visual_index.clamp(0, length - 1))
    return scores.masked_fill(~visual_valid.bool(), float("-inf"))


class TowerAttentionCapture:
    """Context manager copying the q and k of chosen blocks of a timm ViT tower during its forward.

    timm's ``Attention`` runs ``q, k = q_norm(q), k_norm(k)`` right before SDPA (identity modules
    when the tower has no q/k norm), so forward hooks on those two modules see exactly the
    ``[N, H, T, d]`` tensors the attention uses, and the tower's forward is untouched.

    Example::

        with TowerAttentionCapture(tower, layers=(-1,)) as cap:
            feats = tower(pixel_values)
        scores = received_attention(*cap.qk(-1))

    Args:
        tower: A vision tower with ``blocks[i].attn.q_norm`` / ``k_norm`` (SigLIP in visorlib).
        layers: Block indices to capture (negative counts from the end).

    Raises:
        ReductionSpecError: The tower exposes no such attention (a method needing tower attention
            cannot run on it), or a layer is out of range.
    """

    def __init__(self, tower: nn.Module, layers: tuple[int, ...]):
        blocks = getattr(tower, "blocks", None)
        attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
        if attn is None or not hasattr(attn, "q_norm") or not hasattr(attn, "k_norm"):
            raise ReductionSpecError(
                f"vision tower {type(tower).__name__} does not expose its attention queries and keys "
                "(timm ViT blocks with attn.q_norm / attn.k_norm); methods that score tokens by the "
                "tower's attention (visionzip, vispruner, hired) cannot run on it"
            )
        depth = len(blocks)
        self.blocks = blocks
        self.layers = {}
        for layer in layers:
            if not -depth <= layer < depth:
                raise ReductionSpecError(f"tower layer {layer} is out of range for a {depth}-block vision tower")
            self.layers[layer] = layer % depth
        self._store: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> TowerAttentionCapture:
        for index in set(self.layers.values()):
            attn = self.blocks[index].attn
            for which, module in (("q", attn.q_norm), ("k", attn.k_norm)):
                self._handles.append(module.register_forward_hook(self._hook(index, which)))
        return self

    def _hook(self, index: int, which: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._store[(index, which)] = output.detach()

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured ``(q, k)``, each ``[N, H, T, d]``, of block ``layer``."""
        index = self.layers[layer]
        if (index, "q") not in self._store:
            raise RuntimeError(f"block {index} was not run inside the capture")
        return self._store[(index, "q")], self._store[(index, "k")]

    def received(self, layer: int, chunk: int = 64) -> torch.Tensor:
        """:func:`received_attention` of block ``layer``: ``[N, T]``."""
        return received_attention(*self.qk(layer), chunk=chunk)

    def keys(self, layer: int) -> torch.Tensor:
        """Keys of block ``layer`` averaged over heads, ``[N, T, d]`` (VisionZip's similarity metric)."""
        return self.qk(layer)[1].mean(dim=1)
