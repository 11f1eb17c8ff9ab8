"""Where the text looks, layer by layer: attention shares by interaction type (paper §3, Fig. 2).

For every decoder layer we ask how a text token's attention (a softmax over the keys the layer
lets it see) splits between four disjoint groups of tokens:

* **image** — the visual tokens;
* **query** — the prompt's text after the first image (the question and the chat template
  around it), except the prompt's last token;
* **answer** — the positions that *predict* the reference answer: the prompt's last token and
  every answer token but the last (teacher forcing: exactly the queries that produce the answer
  when it is generated);
* **other** — everything else (system prompt and template before the image).

A share is the attention mass on a key group, averaged over heads and over the tokens of the
source group (query or answer), per sample. The paper's three curves are ``query→image``,
``answer→image`` and ``answer→query``; all eight (source, key group) numbers are kept, and each
source's four shares sum to 1.

**Exact, without eager attention.** The model keeps running SDPA. A probe sits in the executor's
per-layer observer slot (:class:`~visorlib.visor.executor.PlanExecutor`), takes each layer's input
and recomputes its queries (only at query and answer tokens) and keys with
:func:`~visorlib.visor.pruning.layer_queries_keys` — the same path FastV / PyramidDrop scores use
— and forms the softmax in chunks of queries with
:func:`~visorlib.visor.reduction.query_attention`, so memory is ``heads x chunk x L`` whatever the
number of visual tokens, never ``L x L``.

**VISOR models.** A layer the sample does not execute as self-attention runs on text only: its
image share is 0 by construction (the probe masks the visual keys exactly as the layer does). In a
cross-attention layer every text token attends to visual tokens only (softmax over the image), so
the share there is 1 by construction; what varies is how much the block moves the text, reported
as the *CA update ratio* ``|CA(t) - t| / |t|`` per source group (a forward hook on the block).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..visor.plan import SELF
from ..visor.pruning import layer_queries_keys
from ..visor.reduction import query_attention
from ..visor.streams import compact, gather_tokens

KEY_GROUPS = ("image", "query", "answer", "other")
SOURCES = ("query", "answer")


@dataclass
class TokenGroups:
    """The four disjoint token groups of a batch, each ``[B, L]`` bool (see the module docstring)."""

    image: torch.Tensor
    query: torch.Tensor
    answer: torch.Tensor
    other: torch.Tensor

    @classmethod
    def build(cls, visual_mask: torch.Tensor, attention_mask: torch.Tensor, answer: torch.Tensor) -> TokenGroups:
        """Groups from the visual tokens, the real tokens and the answer-predicting positions.

        Args:
            visual_mask: ``[B, L]`` True on visual tokens.
            attention_mask: ``[B, L]`` 1 on real tokens.
            answer: ``[B, L]`` True at positions whose next token is a reference-answer token
                (:func:`answer_positions`).
        """
        real = attention_mask.bool()
        image = visual_mask & real
        answer = answer & real & ~image
        seen = image.long().cumsum(1) > 0  # at or after the first visual token
        text = real & ~image & ~answer
        query = text & seen
        return cls(image, query, answer, text & ~seen)

    def keys(self) -> torch.Tensor:
        """``[4, B, L]``: the groups in :data:`KEY_GROUPS` order."""
        return torch.stack([self.image, self.query, self.answer, self.other])


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` True where the next token is a target (``labels != -100``): the answer's queries."""
    target = labels != -100
    return torch.cat([target[:, 1:], torch.zeros_like(target[:, :1])], dim=1)


def attention_mass(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                   key_groups: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Mean attention mass of some queries of one sample on each key group.

    Args:
        q: ``[1, Hq, Q, d]`` queries (rotary applied).
        k: ``[1, Hkv, L, d]`` keys.
        positions: ``[1, Q]`` sequence position of each query (causal mask).
        key_valid: ``[1, L]`` the keys the layer lets these queries see (besides causality).
        key_groups: ``[G, L]`` bool, disjoint key groups.
        chunk: Queries per softmax block; peak memory ``Hq * chunk * L`` floats.

    Returns:
        ``[G]`` float64: mass per group, averaged over heads and queries (NaN when ``Q == 0``).
    """
    n, length = q.shape[2], k.shape[2]
    if n == 0:
        return torch.full((key_groups.shape[0],), float("nan"), dtype=torch.float64)
    every = torch.arange(length, device=k.device)[None]
    total = torch.zeros(length, dtype=torch.float64, device=k.device)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        rows = q[:, :, part].shape[2]
        # query_attention averages over heads and this chunk's queries; weight by the chunk size.
        mean = query_attention(q[:, :, part], k, positions[:, part], key_valid, every, torch.ones_like(every, dtype=torch.bool))
        total += mean[0].double() * rows
    return (key_groups.double() @ total / n).cpu()


class AttentionProbe:
    """Executor observer collecting attention shares, CA update ratios and visual hidden states.

    Args:
        groups: Token groups of the batch.
        executes: ``[B, num_layers]`` bool: the sample runs the layer's self-attention (a SELF
            role layer executed by its configuration).
        chunk: Queries per softmax block.
        keep_states: Also keep the visual tokens' hidden states entering every layer and leaving
            the last (for CKA).
    """

    def __init__(self, groups: TokenGroups, executes: torch.Tensor, chunk: int = 64, keep_states: bool = False):
        self.groups, self.executes, self.chunk, self.keep_states = groups, executes, chunk, keep_states
        batch, layers = executes.shape
        self.shares = torch.full((batch, layers, len(SOURCES), len(KEY_GROUPS)), float("nan"), dtype=torch.float64)
        self.ca_update = torch.full((batch, layers, len(SOURCES)), float("nan"), dtype=torch.float64)
        self.states: list[torch.Tensor] = []  # [B, N_v, D] per layer boundary, float32
        self.visual_valid: torch.Tensor | None = None
        self._layout = None
        self._layer = -1

    def before_layer(self, state, index: int, layer) -> None:
        """Shares of ``layer`` from its input; the visual states entering it."""
        self._layout, self._layer = state.layout, index
        if self.keep_states:
            self._keep_visual(state)
        sources = self.groups.query | self.groups.answer
        index_q, valid_q = compact(sources)
        length = sources.shape[1]
        positions = torch.where(valid_q, index_q, length)
        q, k = layer_queries_keys(state, layer, positions)
        runs_sa = self.executes[:, index] & (state.ex.plan.roles[index] == SELF)
        real = state.new_mask.bool()
        key_valid = real & (runs_sa[:, None] | ~state.visual_mask)
        key_groups = self.groups.keys()
        for b in range(q.shape[0]):
            for s, name in enumerate(SOURCES):
                picked = (gather_tokens(getattr(self.groups, name), index_q)[b] & valid_q[b]).nonzero().squeeze(1)
                self.shares[b, index, s] = attention_mass(
                    q[b:b + 1, :, picked], k[b:b + 1], index_q[b:b + 1, picked], key_valid[b:b + 1],
                    key_groups[:, b], self.chunk)

    def finish(self, state) -> None:
        """The visual states leaving the last layer."""
        if self.keep_states:
            self._keep_visual(state)

    def _keep_visual(self, state) -> None:
        layout = state.layout
        visual = state.visual if state.hidden is None else gather_tokens(state.hidden, layout.visual_index)
        self.states.append(visual.detach().float())
        self.visual_valid = layout.visual_valid

    def cross_hook(self, _module, args, _kwargs, output) -> None:
        """Forward hook of a cross-attention block: ``|update| / |text|`` per source group."""
        text_in, text_out = args[0], output[0]
        ratio = (text_out - text_in).float().norm(dim=-1) / text_in.float().norm(dim=-1).clamp_min(1e-12)
        layout = self._layout
        for s, name in enumerate(SOURCES):
            mask = gather_tokens(getattr(self.groups, name), layout.text_index) & layout.text_valid
            count = mask.sum(1)
            mean = (ratio * mask).sum(1).double() / count.clamp_min(1)
            self.ca_update[:, self._layer, s] = torch.where(count > 0, mean, float("nan")).cpu()


@contextmanager
def observing(model, probe: AttentionProbe) -> Iterator[AttentionProbe]:
    """Attach ``probe`` to ``model``'s prefills (and its cross-attention blocks) for the ``with`` body."""
    lm = model.language_model
    if lm.observer is not None:
        raise RuntimeError(f"{model.cfg.name} is already being observed")
    handles = [block.register_forward_hook(probe.cross_hook, with_kwargs=True)
               for block in (model.cross_attention or {}).values()]
    lm.observer = probe
    try:
        yield probe
    finally:
        lm.observer = None
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def measure_batch(model, inputs: dict, answer: torch.Tensor, sa_layers: object = None, chunk: int = 64,
                  keep_states: bool = False) -> AttentionProbe:
    """One teacher-forced forward of a batch, observed.

    Args:
        model: A visorlib model (any family; dense or VISOR).
        inputs: The model's forward arguments (``input_ids``, ``attention_mask``, pixels ...),
            the reference answer already in ``input_ids``.
        answer: ``[B, L]`` answer-predicting positions (:func:`answer_positions` of the labels).
        sa_layers: One fixed configuration (None: the card's default; ``"all"``; a list; a
            :class:`~visorlib.visor.LayerRequest`); the router is not run here.
        chunk: Queries per softmax block.
        keep_states: Keep the visual hidden states for CKA.

    Returns:
        The probe with ``shares [B, layers, 2, 4]``, ``ca_update [B, layers, 2]`` and, with
        ``keep_states``, ``states`` (``layers + 1`` tensors ``[B, N_v, D]``) and ``visual_valid``.
    """
    inputs = {key: value for key, value in inputs.items() if key != "labels"}
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    request = model.language_model.request(sa_layers, batch)
    if request.routed:
        raise ValueError("analysis runs one fixed configuration per pass; pass layers, 'all' or None, not 'router'")
    executes = request.mask(model.plan.num_layers, input_ids.device)
    groups = TokenGroups.build(model.language_model.visual_token_mask(input_ids), mask, answer.to(input_ids.device))
    probe = AttentionProbe(groups, executes, chunk, keep_states)
    with observing(model, probe):
        # No token reduction: the measurement is of the model itself, every visual token present.
        model(**inputs, sa_layers=request, logits_to_keep=1, token_reduction=[])
    return probe
