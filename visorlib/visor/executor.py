"""One executor for every layer plan: dense, VISOR, fixed or per-sample configurations.

The hidden states live in one of two forms and are converted only when a layer needs the other:

* **merged** — ``[B, L, D]`` in the original token order, as a dense model sees them;
* **split** — a text stream ``[B, N_t, D]`` and a visual stream ``[B, N_v, D]`` (each left-padded,
  tokens in their original order), with the original rotary positions kept per token.

A layer whose SA candidate runs for every sample works on the merged form, exactly like the dense
model (so the dense plan, which never splits, reproduces the dense logits bit for bit). Text-only
and cross-attention layers work on the text stream alone, so their cost does not grow with the
number of visual tokens. When samples of one batch execute different SA layers, each such layer
runs the merged computation on the executing samples and the text-only one on the others
("gather per layer"); every sample gets what it would get alone.

A pass is :meth:`PlanExecutor.start`, then :meth:`~PlanExecutor.run_layers` over one or more
ranges of layers (the router's two phases are two ranges with the routing decision between them),
then :meth:`~PlanExecutor.finish`. With in-LLM token reduction (:mod:`visorlib.visor.pruning`) the
state also shrinks: from a pruning layer on, the sequence holds only the kept visual tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.cache import KVCache, RowWriter
from ..modules.layers import causal_padding_mask
from .plan import CROSS, SELF, LayerPlan
from .pruning import Pruning
from .streams import Layout, compact, gather_positions, gather_tokens, scatter_tokens


class PlanExecutor:
    """Runs a decoder's layers under a :class:`LayerPlan` for one forward pass.

    Args:
        decoder: A decoder with ``layers`` and ``rotary`` (e.g. :class:`~visorlib.modules.qwen2.Qwen2Decoder`).
        plan: Layer roles.
        cross: Cross-attention blocks keyed by layer index (``str``).
        implementation: Attention backend.
        pruning: In-LLM token reduction, applied before each layer of the prefill.
        observer: Read-only probe of the prefill (``visorlib.analysis``): its ``before_layer(state,
            index, layer)`` sees each layer's input, its ``finish(state)`` the last layer's output.
    """

    def __init__(self, decoder: nn.Module, plan: LayerPlan, cross: nn.ModuleDict | None, implementation: str,
                 pruning: Pruning | None = None, observer=None):
        self.decoder, self.plan, self.cross, self.impl, self.pruning = decoder, plan, cross, implementation, pruning
        self.observer = observer

    def start(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_mask: torch.Tensor,
        segments: torch.Tensor,
        cache: KVCache | None = None,
    ) -> _State:
        """The state of one forward pass, before its first layer.

        Args:
            hidden: Input embeddings in original order.
            position_ids: ``[B, L]`` rotary positions, or ``[3, B, L]`` (temporal, height, width) under
                M-RoPE; the text stream keeps each token's own positions whatever the layer's role.
            attention_mask: ``[B, L_past + L]``, 0 on padding.
            visual_mask: ``[B, L]``, True on visual tokens.
            segments: ``[B, L]`` image/video ordinal of each visual token (-1 elsewhere).
            cache: Filled (prefill) or extended (decode) in place.
        """
        past = cache.seen if cache is not None else 0
        if past and self.plan.ca_layers and bool(visual_mask.any()):
            raise ValueError("visual tokens can only enter in the first (prefill) call of a VISOR model")
        return _State(self, hidden, position_ids, attention_mask, visual_mask, segments, past, cache)

    def run_layers(self, state: _State, executes: torch.Tensor, layers: range) -> None:
        """Run ``layers`` (in order) on ``state``; ``executes [B, num_layers]``: does the SA run for the sample."""
        for index in layers:
            layer, role = self.decoder.layers[index], self.plan.roles[index]
            if self.pruning is not None and not state.past:
                self.pruning.before_layer(state, index, layer)
            if self.observer is not None and not state.past:
                self.observer.before_layer(state, index, layer)
            run_sa = executes[:, index] if role == SELF else torch.zeros_like(executes[:, index])
            if state.past:
                # Decoding: each layer attends over whatever its cache holds for each sample, so the
                # configuration chosen at prefill carries over without being passed again.
                state.decode_layer(index, layer, cross=role == CROSS)
            elif bool(run_sa.all()):
                state.merged_layer(index, layer)
            elif bool(run_sa.any()):
                state.mixed_layer(index, layer, run_sa)
            else:
                state.text_layer(index, layer, cross=role == CROSS)

    def finish(self, state: _State) -> torch.Tensor:
        """Merged hidden states ``[B, L, D]`` after the last layer; the cache counts the new tokens."""
        if state.cache is not None:
            state.cache.seen += state.length
        if self.observer is not None and not state.past:
            self.observer.finish(state)
        return state.restored()

    def run(self, hidden, position_ids, attention_mask, visual_mask, segments, executes, cache=None) -> torch.Tensor:
        """Every layer under one fixed ``executes`` table: :meth:`start`, :meth:`run_layers`, :meth:`finish`."""
        state = self.start(hidden, position_ids, attention_mask, visual_mask, segments, cache)
        self.run_layers(state, executes, range(self.plan.num_layers))
        return self.finish(state)


class _State:
    """The hidden states of one forward, merged or split, with their masks and rotary tables."""

    def __init__(self, ex: PlanExecutor, hidden, position_ids, attention_mask, visual_mask, segments, past, cache):
        self.ex, self.past, self.cache = ex, past, cache
        # The states live in one of two forms (module docstring): ``hidden`` merged [B, L, D] in the
        # original order, or ``text`` [B, N_t, D] and ``visual`` [B, N_v, D] streams. The form not
        # in use is None.
        self.hidden: torch.Tensor | None = hidden
        self.text: torch.Tensor | None = None
        self.visual: torch.Tensor | None = None
        self.positions = position_ids
        self.attention_mask = attention_mask
        self.new_mask = attention_mask[:, past:]
        self.visual_mask, self.segments = visual_mask, segments
        self.length = visual_mask.shape[1]  # tokens of the input, whatever pruning keeps
        self.origin: torch.Tensor | None = None  # [B, L'] input position of each slot, once pruned
        self._layout: Layout | None = None
        self._cache: dict[str, object] = {}

    # -- layout and tables ------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = Layout.build(self.visual_mask, self.new_mask)
        return self._layout

    def _memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def full_rope(self):
        return self._memo("full_rope", lambda: self.ex.decoder.rotary(self.positions, self._dtype()))

    def text_rope(self):
        return self._memo(
            "text_rope",
            lambda: self.ex.decoder.rotary(gather_positions(self.positions, self.layout.text_index), self._dtype()),
        )

    def full_mask(self):
        def make():
            length = self.new_mask.shape[1]
            if bool(self.attention_mask.all()) and (self.past == 0 or length == 1):
                return None
            return causal_padding_mask(self.attention_mask, length, self.past)

        return self._memo("full_mask", make)

    def text_mask(self):
        valid = self.layout.text_valid
        return self._memo("text_mask", lambda: None if bool(valid.all()) else causal_padding_mask(valid.long(), valid.shape[1]))

    def cross_mask(self):
        def make():
            lay = self.layout
            # A text token reads the visual tokens of the images that came before it in the
            # sequence. Sequence order, not rotary positions: under M-RoPE the two differ.
            mask = (lay.visual_index[:, None, :] < lay.text_index[:, :, None]) & lay.visual_valid[:, None, :]
            return mask[:, None]

        return self._memo("cross_mask", make)

    def _dtype(self):
        return (self.hidden if self.hidden is not None else self.text).dtype

    # -- conversions -------------------------------------------------------------------------
    def merged(self) -> torch.Tensor:
        if self.hidden is None:
            base = torch.zeros(*self.visual_mask.shape, self.text.shape[-1], dtype=self.text.dtype, device=self.text.device)
            base = scatter_tokens(base, self.layout.visual_index, self.visual)
            self.hidden = scatter_tokens(base, self.layout.text_index, self.text)
        return self.hidden

    def restored(self) -> torch.Tensor:
        """Merged states in the input's layout ``[B, L, D]``: pruned visual positions are zero."""
        merged = self.merged()
        if self.origin is None:
            return merged
        base = merged.new_zeros(merged.shape[0], self.length, merged.shape[-1])
        return scatter_tokens(base, self.origin, merged)

    def keep_visual(self, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keep each sample's text and visual-stream slots ``slots [B, K]`` (-1 padded); drop the other
        visual tokens from every later layer (prefill only). Tokens keep their rotary positions."""
        lay = self.layout
        kept = slots >= 0
        positions = gather_tokens(lay.visual_index, slots.clamp_min(0))  # sequence position of each kept slot
        real = self.new_mask.bool()
        keep = real & ~self.visual_mask
        keep = scatter_tokens(keep, torch.where(kept, positions, self.visual_mask.shape[1]), kept) | keep
        index, valid = compact(keep)
        self.hidden = gather_tokens(self.merged(), index)
        self.text = self.visual = None
        self.positions = gather_positions(self.positions, index)
        self.visual_mask = gather_tokens(self.visual_mask, index) & valid
        self.segments = torch.where(valid, gather_tokens(self.segments, index), -1)
        origin = index if self.origin is None else gather_tokens(self.origin, index)
        self.origin = torch.where(valid, origin, self.length)
        self.attention_mask = self.new_mask = valid.long()
        self._layout, self._cache = None, {}

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text is None:
            self.text = gather_tokens(self.hidden, self.layout.text_index)
            self.visual = gather_tokens(self.hidden, self.layout.visual_index)
        self.hidden = None  # the streams are about to change
        return self.text, self.visual

    def text_states(self) -> torch.Tensor:
        """Current text stream ``[B, N_t, D]`` (for the router)."""
        return self.text if self.hidden is None else gather_tokens(self.hidden, self.layout.text_index)

    # -- layer kinds ---------------------------------------------------------------------------
    def merged_layer(self, index, layer):
        hidden = self.merged()
        self.text = self.visual = None
        if self.cache is not None:
            self.cache.extend_mask(index, self.new_mask)
        self.hidden = layer(hidden, self.full_rope(), self.full_mask(), self.ex.impl, self.cache, index)

    def text_layer(self, index, layer, cross: bool):
        text, visual = self.split()
        cache = self.cache
        if cross:
            block = self.ex.cross[str(index)]
            segments = gather_tokens(self.segments, self.layout.visual_index)
            text, kv = block(text, self.cross_mask(), self.ex.impl, visual=visual, segments=segments)
            if cache is not None:
                cache.cross[index] = (*kv, self.layout.visual_valid)
                cache.cross_projections += 1
        if cache is not None:
            cache.extend_mask(index, self.layout.text_valid)
        self.text = layer(text, self.text_rope(), self.text_mask(), self.ex.impl, cache, index)

    def mixed_layer(self, index, layer, run_sa):
        """Executing samples run the merged layer, the others the text-only one.

        With a cache, the layer's slot is one ``[B, H, L, d]`` tensor in the merged layout: each
        group writes its keys/values at its own tokens' sequence positions, and the rows of
        skipping samples mark only their text positions valid.
        """
        text, visual = self.split()
        rows = run_sa.nonzero().squeeze(1)
        rest = (~run_sa).nonzero().squeeze(1)
        lay, sub = self.layout, self.layout.select(rows)
        batch, length = self.visual_mask.shape
        zeros = torch.zeros(len(rows), length, text.shape[-1], dtype=text.dtype, device=text.device)
        merged = scatter_tokens(scatter_tokens(zeros, sub.visual_index, visual[rows]), sub.text_index, text[rows])
        mask, text_mask = self.full_mask(), self.text_mask()
        every = torch.arange(length, device=text.device).expand(len(rows), -1)
        writers = (None, None)
        if self.cache is not None:
            writers = (RowWriter(self.cache, rows, every, batch, length),
                       RowWriter(self.cache, rest, lay.text_index[rest], batch, length))
        rope = tuple(t[rows] for t in self.full_rope())
        merged = layer(merged, rope, None if mask is None else mask[rows], self.ex.impl, writers[0], index)
        rope_t = tuple(t[rest] for t in self.text_rope())
        text_rest = layer(text[rest], rope_t, None if text_mask is None else text_mask[rest], self.ex.impl,
                          writers[1], index)
        text, visual = text.clone(), visual.clone()
        text[rows] = gather_tokens(merged, sub.text_index)
        visual[rows] = gather_tokens(merged, sub.visual_index)
        text[rest] = text_rest
        self.text, self.visual = text, visual
        if self.cache is not None:
            valid = self.new_mask.bool().clone()
            valid[rest] = scatter_tokens(torch.zeros_like(valid[rest]), lay.text_index[rest], lay.text_valid[rest])
            self.cache.extend_mask(index, valid)

    def decode_layer(self, index, layer, cross: bool):
        """New (text) tokens after a prefill: every layer attends over what its cache holds."""
        cache = self.cache
        hidden = self.merged()
        if cross:
            k, v, valid = cache.cross[index]
            mask = valid[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
            hidden, _ = self.ex.cross[str(index)](hidden, mask, self.ex.impl, visual_kv=(k, v))
        keys = cache.extend_mask(index, self.new_mask)
        self.hidden = layer(hidden, self.full_rope(), self._decode_mask(keys, hidden.shape[1]), self.ex.impl, cache, index)
        self.text = self.visual = None

    @staticmethod
    def _decode_mask(keys: torch.Tensor, new: int) -> torch.Tensor:
        """Queries (the last ``new`` keys) see valid earlier keys, and each other causally."""
        total = keys.shape[1]
        q = torch.arange(total - new, total, device=keys.device)
        k = torch.arange(total, device=keys.device)
        mask = (k[None, :] <= q[:, None])[None] & keys[:, None, :]
        mask = mask | (k[None, :] == q[:, None])[None]
        return mask[:, None]
