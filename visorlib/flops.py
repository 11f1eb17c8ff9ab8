"""Analytic FLOPs and KV-cache bytes of a prefill, per component.

Counting rules (the same as ``torch.utils.flop_counter.FlopCounterMode``, so the two can be
checked against each other): a matmul of ``[m, k] @ [k, n]`` costs ``2*m*k*n``; attention costs
``2 * Lq * Lk * head_dim`` per head for the scores and the same again for the weighted sum, over
the *full* ``Lq x Lk`` rectangle (SDPA does not skip the masked half); norms, activations,
rotary embeddings and softmax are ignored (they are O(L*d), below 1 % at these sizes).
The one exception to "analytic" is FastVLM's FastViT tower, whose FLOPs are counted once per
configuration on the meta device (:func:`~visorlib.modules.counting.counted_tower_flops`).
Each family supplies its tower and projector formulas (:class:`~visorlib.registry.Family`).

Token reduction (``token_reduction=``, ``docs/token-reduction.md``) is counted exactly: a pre-LLM
method leaves each image its kept tokens plus one ``image_newline`` (LLaVA-OneVision's reduced
layout) and only those go through the projector; an in-LLM method changes the visual tokens of
every layer from its pruning layer on (:func:`~visorlib.visor.reduction.tokens_per_layer`). Scoring
is charged where it runs: the tower-attention scores of the scored blocks and the methods'
similarity products (``vision_scoring``), and per scoring decoder layer the ``k`` projection of the
sequence, ``q`` of the last token and its score row (``decoder_scoring``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import DecoderConfig, ModelConfig
from .modules.counting import attention_core_flops, linear_flops
from .registry import family_of
from .visor.plan import CROSS, SELF, LayerPlan
from .visor.reduction import (
    IN_LLM,
    PRE_LLM,
    Reducer,
    ReductionSpecError,
    VisionZip,
    VisPruner,
    drops_nothing,
    parse_reduction,
    pre_llm_tokens,
    prune_points,
    resolve_keep,
    tokens_per_layer,
    tower_layers,
)


@dataclass
class FlopReport:
    """FLOPs per component of one forward pass, plus the KV cache it leaves behind.

    Attributes:
        components: Ordered ``{name: flops}`` (``vision_tower``, ``projector``, ``decoder``, ``lm_head``).
        kv_cache_bytes: Bytes of keys and values cached for later decoding.
        n_visual: Visual tokens in the decoder's sequence (after pre-LLM reduction; layer 0's).
        n_text: Text tokens in the decoder's sequence.
        decode_step: FLOPs of generating the first token after this prefill.
        visual_per_layer: Visual tokens each decoder layer sees (they shrink under in-LLM reduction).
    """

    components: dict[str, float] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    n_visual: int = 0
    n_text: int = 0
    decode_step: float = 0.0
    visual_per_layer: list[int] = field(default_factory=list)

    @property
    def language_model(self) -> float:
        """Decoder layers, cross-attention, in-LLM scoring and LM head: what the VISOR paper's FLOP counts cover."""
        vision = ("vision_tower", "projector", "vision_scoring")
        return self.total - sum(self.components.get(name, 0.0) for name in vision)

    @property
    def total(self) -> float:
        """Sum over components."""
        return float(sum(self.components.values()))


def decoder_layer_flops(cfg: DecoderConfig, q_len: int, k_len: int | None = None) -> float:
    """One decoder layer: ``q_len`` new tokens attending to ``k_len`` keys (default: themselves)."""
    k_len = q_len if k_len is None else k_len
    kv_width = cfg.num_kv_heads * cfg.head_dim
    return (
        linear_flops(q_len, cfg.hidden_size, cfg.hidden_size + 2 * kv_width)
        + attention_core_flops(q_len, k_len, cfg.num_heads, cfg.head_dim)
        + linear_flops(q_len, cfg.hidden_size, cfg.hidden_size)
        + 3 * linear_flops(q_len, cfg.hidden_size, cfg.intermediate_size)
    )


def kv_bytes_per_token(cfg: DecoderConfig, bytes_per_value: int = 2) -> int:
    """Cache bytes one token costs in one layer (keys + values)."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * bytes_per_value


def cross_attention_flops(cfg: DecoderConfig, n_text: int, n_visual: int, project_visual: bool = True) -> float:
    """One cross-attention block: q/o on text, k/v on visual (unless cached), scores and sum."""
    kv_width = cfg.num_kv_heads * cfg.head_dim
    flops = linear_flops(n_text, cfg.hidden_size, cfg.hidden_size) * 2
    flops += attention_core_flops(n_text, n_visual, cfg.num_heads, cfg.head_dim)
    if project_visual:
        flops += linear_flops(n_visual, cfg.hidden_size, 2 * kv_width)
    return flops


def _configuration(cfg: ModelConfig, sa_layers: object) -> list[int]:
    """The one configuration ``sa_layers`` names, checked by the rule every entry point uses."""
    from .visor.plan import LayerPlan, validate_sa_layers

    plan = LayerPlan(cfg.decoder.num_layers, cfg.visor)
    if isinstance(sa_layers, str) and sa_layers != "all" and not plan.dense:
        raise ValueError(f"sa_layers={sa_layers!r}: FLOPs need a concrete configuration (a list of layers)")
    (configuration,) = validate_sa_layers(plan, sa_layers, 1, model=cfg.name)
    return configuration


def pre_llm_scoring_flops(cfg: ModelConfig, spec: Reducer, tiles: int) -> float:
    """Matmul FLOPs a pre-LLM method spends choosing tokens in ``tiles`` tiles (beyond the tower itself).

    Received attention (:func:`~visorlib.visor.reduction.received_attention`) recomputes ``q k^T``
    of each scored tower block over the unpacked grid (``2 T^2 d`` per head and tile; HiRED scores
    two blocks). VisionZip adds the key similarity of merged tokens to targets, VisPruner its
    duplicate-removal rounds over the (packed) features; pooling and the selections are free.
    """
    if not spec.needs_tower_attention:
        return 0.0
    vision = cfg.vision
    head_dim = vision.hidden_size // vision.num_heads
    grid_tokens = vision.grid_size**2
    per_tile = len(tower_layers(spec)) * 2.0 * vision.num_heads * grid_tokens**2 * head_dim
    tokens = cfg.feature_grid_size**2  # the tokens a method selects among (packed, under VISOR-TR)
    packing = cfg.visor is not None and cfg.visor.packing_ratio > 1
    width = vision.hidden_size * (4 if packing else 1)
    if isinstance(spec, VisionZip):
        dominant, contextual = spec.split(resolve_keep(spec.keep, tokens, "a tile"))
        per_tile += 2.0 * (tokens - dominant - contextual) * contextual * head_dim if contextual else 0.0
    elif isinstance(spec, VisPruner):
        important, diverse = spec.split(resolve_keep(spec.keep, tokens, "a tile"))
        left = tokens - important if diverse else 0
        while (step := min(spec.step, left - diverse)) > 0:  # the rounds of pre_llm.vispruner
            per_tile += 2.0 * ((left + 1) // 2) * (left // 2) * width
            left -= step
    return tiles * per_tile


def _image_tiles(tiles: int | Sequence[int]) -> list[int]:
    return [tiles] if isinstance(tiles, int) else [int(t) for t in tiles]


def prefill_flops(
    cfg: ModelConfig,
    n_visual: int,
    n_text: int,
    tiles: int | Sequence[int] = 0,
    sa_layers: object = None,
    logits_for: int = 1,
    bytes_per_value: int = 2,
    token_reduction: object = None,
) -> FlopReport:
    """FLOPs of one prefill under a layer configuration (dense models: every layer over all tokens).

    Args:
        cfg: The model.
        n_visual: Visual tokens in the language model's sequence (after any packing) without
            token reduction; under a pre-LLM method the reduced count is derived from ``tiles``.
        n_text: Text tokens in the sequence.
        tiles: Tiles (or frames) through the vision tower; 0 counts the language model only. For
            Qwen2-VL, patches (an int, or one count per frame; see the family's ``tower_flops``).
            Under a pre-LLM method: the tiles of the one image, or one count per image.
        sa_layers: Configuration (None = the card's default, ``"all"``, or a list of SA layers).
        logits_for: Positions whose logits are computed (1 for generation).
        bytes_per_value: KV-cache element size (2 for bf16/fp16).
        token_reduction: A spec (``docs/token-reduction.md``); None counts none (not the card's:
            :func:`flops` resolves the card's default).
    """
    dec = cfg.decoder
    plan = LayerPlan(dec.num_layers, cfg.visor)
    executed = set(_configuration(cfg, sa_layers))
    reducers = parse_reduction(token_reduction)
    pre = next((r for r in reducers if r.where == PRE_LLM), None)
    in_llm = [r for r in reducers if r.where == IN_LLM]
    family = family_of(cfg)
    if pre is not None and family.pre_llm_tokens is None:
        raise ReductionSpecError(f"token_reduction: {pre.name} is a pre-LLM method, which {cfg.name} does not run")
    all_tiles = sum(_image_tiles(tiles)) if pre is not None else tiles
    if pre is not None and drops_nothing(pre, cfg.feature_grid_size**2):
        pre = None  # the model runs no reducer then (no scoring) and keeps the unreduced layout
    if pre is not None:
        n_visual = family.pre_llm_tokens(cfg, pre, tiles)
    visual = tokens_per_layer(in_llm, n_visual, dec.num_layers)
    report = FlopReport(n_visual=n_visual, n_text=n_text)
    report.components["vision_tower"] = family.tower_flops(cfg.vision, all_tiles) if all_tiles else 0.0
    projector = family.projector_flops(cfg, all_tiles) if all_tiles else 0.0
    if pre is not None:  # the projector is linear in tokens and runs on the kept ones only
        kept = sum(pre_llm_tokens(pre, cfg.feature_grid_size**2, n) for n in _image_tiles(tiles))
        projector *= kept / (all_tiles * cfg.feature_grid_size**2)
        report.components["vision_scoring"] = pre_llm_scoring_flops(cfg, pre, all_tiles)
    report.components["projector"] = projector
    text_layers = self_layers = cross = 0.0
    cached_tokens = 0
    for index, role in enumerate(plan.roles):
        if role == SELF and index in executed:
            self_layers += decoder_layer_flops(dec, visual[index] + n_text)
            cached_tokens += visual[index] + n_text
            continue
        if role == CROSS:
            cross += cross_attention_flops(dec, n_text, visual[index])
            cached_tokens += visual[index]  # the projected visual keys/values are kept for decoding
        text_layers += decoder_layer_flops(dec, n_text)
        cached_tokens += n_text
    report.components["decoder_self_attention_layers"] = self_layers
    report.components["decoder_text_only_layers"] = text_layers
    report.components["cross_attention"] = cross
    if in_llm:
        report.components["decoder_scoring"] = decoder_scoring_flops(dec, in_llm, n_visual, visual, n_text)
    report.components["lm_head"] = linear_flops(logits_for, dec.hidden_size, dec.vocab_size)
    report.kv_cache_bytes = cached_tokens * kv_bytes_per_token(dec, bytes_per_value)
    report.decode_step = decode_step_flops(cfg, n_visual, n_text, sa_layers, visual)
    report.visual_per_layer = visual
    return report


def decoder_scoring_flops(
    dec: DecoderConfig, reducers: Sequence[Reducer], n_visual: int, visual: Sequence[int], n_text: int
) -> float:
    """In-LLM scoring (:func:`visorlib.visor.pruning.last_token_scores`) at every scoring layer.

    From the layer's input: ``k`` of the whole sequence (the visual tokens that layer receives and
    the text), ``q`` of the last token, and its ``[heads, 1, L]`` logits against every key.
    """
    total = 0.0
    for reducer in reducers:
        for point in prune_points(reducer, dec.num_layers):
            layer = point.score_layer
            length = n_text + (visual[layer - 1] if layer > 0 else n_visual)  # before this layer's own drop
            total += linear_flops(length, dec.hidden_size, dec.num_kv_heads * dec.head_dim)
            total += linear_flops(1, dec.hidden_size, dec.num_heads * dec.head_dim)
            total += 2.0 * dec.num_heads * length * dec.head_dim
    return total


def decode_step_flops(
    cfg: ModelConfig,
    n_visual: int,
    n_context_text: int,
    sa_layers: object = None,
    visual_per_layer: Sequence[int] | None = None,
) -> float:
    """FLOPs of generating one token after a prefill of ``n_visual`` + ``n_context_text`` tokens.

    Text-only (and skipped) layers attend over the cached text, executed SA layers over visual +
    text, and cross-attention layers read visual keys/values cached at prefill. After in-LLM
    pruning, ``visual_per_layer`` gives the visual tokens each layer's cache holds.
    """
    dec = cfg.decoder
    plan = LayerPlan(dec.num_layers, cfg.visor)
    executed = set(_configuration(cfg, sa_layers))
    visual = [n_visual] * dec.num_layers if visual_per_layer is None else list(visual_per_layer)
    total = linear_flops(1, dec.hidden_size, dec.vocab_size)
    for index, role in enumerate(plan.roles):
        if role == SELF and index in executed:
            total += decoder_layer_flops(dec, 1, visual[index] + n_context_text + 1)
            continue
        if role == CROSS:
            total += cross_attention_flops(dec, 1, visual[index], project_visual=False)
        total += decoder_layer_flops(dec, 1, n_context_text + 1)
    return total


def flops(
    model_or_cfg,
    n_visual: int,
    n_text: int,
    tiles: int | Sequence[int] = 0,
    sa_layers: object = None,
    logits_for: int = 1,
    token_reduction: object = None,
) -> FlopReport:
    """Analytic prefill FLOPs, decode-step FLOPs and KV-cache bytes of a model.

    Args:
        model_or_cfg: A built model (anything with ``.cfg``) or a :class:`~visorlib.config.ModelConfig`.
            A zoo card *name* is resolved one layer up, by the public :func:`visorlib.flops`
            (:func:`visorlib.zoo.flops`): the cost model sits below the zoo.
        n_visual: Visual tokens in the language model's sequence.
        n_text: Text tokens in the sequence.
        tiles: Tiles through the vision tower (0: language model only, as the VISOR paper counts);
            patches for Qwen2-VL (see the family's ``tower_flops``).
        sa_layers: Configuration: None (card default), ``"all"``, or a list of SA layers.
        logits_for: Positions whose logits are computed.
        token_reduction: A token-reduction spec (None: the card's ``token_reduction``; ``[]``: none).
            With a pre-LLM method, ``tiles`` (the image's tiles, or one count per image) set the
            visual tokens, and ``n_visual`` is not read.

    Example::

        flops(model.cfg, n_visual=7371, n_text=64, tiles=10, token_reduction={"method": "visionzip"})
    """
    if isinstance(model_or_cfg, ModelConfig):
        cfg = model_or_cfg
    elif isinstance(model_or_cfg, str):
        raise TypeError(f"visorlib.flops.flops takes a model or a ModelConfig, got the name {model_or_cfg!r}; "
                        "visorlib.flops(name, ...) resolves zoo card names")
    else:
        cfg = model_or_cfg.cfg
    spec = cfg.token_reduction if token_reduction is None else token_reduction
    return prefill_flops(cfg, n_visual, n_text, tiles, sa_layers, logits_for, token_reduction=spec)
