"""Token reduction: registered methods that keep fewer visual tokens, before or inside the language model.

See ``docs/token-reduction.md``. This package holds the specs, the scores, the selection rules
and the token accounting as standalone, tested functions. The models call them: pre-LLM methods
in LLaVA-OneVision's vision path (:mod:`visorlib.models.llava_onevision.model`), in-LLM methods in
the VISOR executor (:mod:`visorlib.visor.pruning`); :mod:`visorlib.flops` reads the accounting.
"""

from .budget import drops_nothing, pre_llm_tokens, tokens_per_layer, tokens_per_layer_batch
from .in_llm import PrunePoint, fastv_select, keep_counts, prune_points, pyramiddrop_select, select_top, take
from .pre_llm import (
    PackedCapture,
    Reduced,
    apply_pre_llm,
    apportion,
    encode_and_reduce,
    hired,
    hired_budgets,
    pooled_side,
    pooling,
    tower_layers,
    visionzip,
    vispruner,
)
from .scores import TowerAttentionCapture, query_attention, received_attention
from .spec import (
    IN_LLM,
    PRE_LLM,
    REDUCERS,
    FastV,
    HiRED,
    Pooling,
    PyramidDrop,
    Reducer,
    ReductionSpecError,
    VisionZip,
    VisPruner,
    list_reducers,
    parse_reduction,
    register_reducer,
    resolve_keep,
)

__all__ = [
    "IN_LLM",
    "PRE_LLM",
    "REDUCERS",
    "FastV",
    "HiRED",
    "Pooling",
    "PackedCapture",
    "PrunePoint",
    "PyramidDrop",
    "Reduced",
    "Reducer",
    "ReductionSpecError",
    "TowerAttentionCapture",
    "VisPruner",
    "VisionZip",
    "apply_pre_llm",
    "apportion",
    "encode_and_reduce",
    "fastv_select",
    "hired",
    "hired_budgets",
    "drops_nothing",
    "keep_counts",
    "list_reducers",
    "parse_reduction",
    "pooled_side",
    "pooling",
    "pre_llm_tokens",
    "prune_points",
    "pyramiddrop_select",
    "query_attention",
    "received_attention",
    "register_reducer",
    "resolve_keep",
    "select_top",
    "take",
    "tokens_per_layer",
    "tokens_per_layer_batch",
    "tower_layers",
    "vispruner",
    "visionzip",
]
