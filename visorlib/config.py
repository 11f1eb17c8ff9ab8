"""Typed, strictly validated model configuration.

A zoo card (``zoo/<name>.yaml``) is parsed into a :class:`ModelConfig`. Every key must be a field
of the matching dataclass and every value must have the declared type, so that a typo such as
``num_layer: 24`` fails loudly (naming the key and the file) instead of silently building a model
with the default. The same strict parser serves overrides passed to :func:`visorlib.build`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is malformed (unknown key, wrong type, bad value)."""


def check_positive(section: str, obj: Any, names: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` naming ``section.name`` for the first of ``names`` that is not > 0.

    Sizes, counts and epsilons of zero or less give a ZeroDivisionError or an empty model far
    from the card that caused them; checked when the card is read instead.
    """
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be positive, got {value!r}")


def check_divisible(section: str, obj: Any, name: str, by: str) -> None:
    """Raise :class:`ConfigError` unless ``obj.name`` is a multiple of ``obj.by``."""
    if getattr(obj, name) % getattr(obj, by):
        raise ConfigError(
            f"{section}.{name}={getattr(obj, name)} must be divisible by {section}.{by}={getattr(obj, by)}"
        )


#: Test-size rules of families whose towers need other geometry than :meth:`ModelConfig.tiny`'s
#: generic shrink: ``family name -> (cfg, overrides) -> overrides``. Filled by
#: :func:`visorlib.registry.register_family`; this module stays a leaf that imports no family.
TINY_RULES: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {}
#: Loads the built-in families (and so their :data:`TINY_RULES`) on first need. Filled by the
#: package's ``__init__`` (the top of the import graph): lower modules hold a slot, not an import.
FAMILY_LOADER: list[Callable[[], None]] = []


@dataclass
class VisionConfig:
    """A ViT-style vision tower (SigLIP for LLaVA-OneVision, Qwen2-VL's own ViT).

    Attributes:
        kind: Name of the vision backbone adapter (``"siglip"``, ``"qwen2_vl"``).
        image_size: Side of the square tile the tower sees, in pixels. ``qwen2_vl`` has no tiles
            (dynamic resolution); its cards set ``patch_size * spatial_merge_size``, the multiple
            that images are resized to.
        patch_size: Side of one patch; a tile yields ``(image_size // patch_size) ** 2`` tokens.
        hidden_size: Width of the tower.
        intermediate_size: Width of the tower's MLP.
        num_layers: Number of transformer blocks kept (LLaVA-OV keeps 26 of SigLIP's 27).
        num_heads: Attention heads.
        layer_norm_eps: LayerNorm epsilon.
        temporal_patch_size: Frames per patch (``qwen2_vl``: 2; an image is two equal frames).
        spatial_merge_size: Side of the square of patches merged into one visual token after the
            tower (``qwen2_vl``: 2, so a token covers 2x2 patches).
        in_channels: Colour channels of the input (3); a patch holds
            ``in_channels * temporal_patch_size * patch_size**2`` values.
        hidden_act: Activation of the tower's MLP (``siglip``): ``"gelu_tanh"`` as in SigLIP
            (default) or ``"gelu"`` (exact, what timm's own SigLIP ViTs use); ``qwen2_vl`` cards
            set ``"quick_gelu"`` (CLIP's ``x * sigmoid(1.702 x)``).
        timm_model: A timm architecture (``"vit_base_patch16_siglip_384"``, ``"fastvit_mci3"``)
            whose hyper-parameters fill in the tower; None (default) builds the tower from the
            fields above. When set, the build step (:func:`visorlib.registry.resolve`) derives the
            fields the architecture determines
            (``siglip``: sizes, depth, heads, eps, activation; ``fastvit``: ``hidden_size``,
            ``patch_size`` = total downsampling, ``num_layers`` = blocks): a field left at its
            default is replaced, one set to a different value is a ``ConfigError``.
        timm_kwargs: Extra keyword arguments for ``timm.create_model`` (only with ``timm_model``),
            e.g. a shrunk FastViT for tests: ``{layers: [1, 1, 1, 1, 1], embed_dims: [8, 16, 32, 64, 128]}``.
        window_size: ``qwen2_5_vl``: side, in pixels, of the square windows most tower blocks
            attend within (112: 4x4 merged tokens); 0 (default) = every block sees the whole frame.
        fullatt_block_indexes: ``qwen2_5_vl``: the tower blocks that attend over the whole frame
            instead of a window (``[7, 15, 23, 31]``); empty by default.
        tokens_per_second: ``qwen2_5_vl``: temporal M-RoPE positions per second of video; a
            video's temporal patch ``i`` sits at ``int(i * tokens_per_second * second_per_grid_t)``.
        downsample_ratio: ``internvl``: the pixel shuffle's ratio (0.5 folds 2x2 patches into one
            token of 4x the width); 1.0 (default) = no shuffle.
        use_qk_norm: ``internvl``: RMSNorm on the queries and keys of the tower's attention.
        layer_scale_init: ``internvl``: initial value of the per-channel layer scales (a tower
            built without a checkpoint); 0 (default) = the tower has no layer scales.
    """

    kind: str = "siglip"
    image_size: int = 384
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "gelu_tanh"
    timm_model: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    window_size: int = 0
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: float = 2.0
    downsample_ratio: float = 1.0
    use_qk_norm: bool = False
    layer_scale_init: float = 0.0

    def __post_init__(self) -> None:
        if self.timm_model is None and self.timm_kwargs:
            raise ConfigError("vision.timm_kwargs is only used together with vision.timm_model")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"vision.fullatt_block_indexes {bad} are not blocks of a {self.num_layers}-block tower")
        if self.window_size < 0 or not 0 < self.downsample_ratio <= 1 or self.tokens_per_second <= 0:
            raise ConfigError("vision.window_size must be >= 0, vision.downsample_ratio in (0, 1] and "
                              "vision.tokens_per_second > 0")
        check_positive("vision", self, ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
                                        "num_heads", "layer_norm_eps", "temporal_patch_size", "spatial_merge_size",
                                        "in_channels"))
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision.image_size={self.image_size} must be at least vision.patch_size={self.patch_size}")
        if self.timm_model is None:  # a timm architecture's attention widths are timm's business
            check_divisible("vision", self, "hidden_size", "num_heads")

    @property
    def grid_size(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens one tile produces before any packing."""
        return self.grid_size**2


@dataclass
class DecoderConfig:
    """A Qwen2-style decoder-only language model.

    Attributes:
        kind: Name of the decoder adapter (``"qwen2"``).
        vocab_size: Rows of the embedding table (and of the LM head).
        hidden_size: Model width.
        intermediate_size: SwiGLU inner width.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention).
        rope_theta: RoPE base frequency.
        rms_norm_eps: RMSNorm epsilon.
        max_position_embeddings: Longest context the model was trained for.
        tie_word_embeddings: Whether the LM head shares the embedding matrix.
        attention_bias: Whether q/k/v projections carry a bias (True for Qwen2).
        mrope_section: Qwen2-VL's multimodal rotary positions (M-RoPE): how many of the
            ``head_dim / 2`` rotary frequencies follow the temporal, height and width position
            (``[16, 24, 24]``); None for plain 1-D positions.
    """

    kind: str = "qwen2"
    vocab_size: int = 152000
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    mrope_section: list[int] | None = None

    def __post_init__(self) -> None:
        check_positive("decoder", self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                         "num_kv_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings"))
        check_divisible("decoder", self, "hidden_size", "num_heads")
        check_divisible("decoder", self, "num_heads", "num_kv_heads")  # grouped-query attention shares kv heads
        if self.head_dim % 2:
            raise ConfigError(f"decoder: head_dim = hidden_size / num_heads = {self.head_dim} must be even (RoPE rotates pairs)")
        section = self.mrope_section
        if section is not None and (len(section) != 3 or min(section) < 0 or sum(section) != self.head_dim // 2):
            raise ConfigError(f"decoder.mrope_section {section} must be 3 non-negative numbers summing to "
                              f"head_dim / 2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


@dataclass
class ImageProcessingConfig:
    """How PIL images become ``pixel_values`` (LLaVA-OneVision anyres).

    Attributes:
        image_mean: Per-channel mean subtracted after scaling to [0, 1].
        image_std: Per-channel std divided by.
        grid_pinpoints: Candidate tiled resolutions ``[height, width]``; ``None`` means
            ``[tile*i, tile*j]`` for ``i, j`` in ``1..max_grid``.
        max_grid: Largest number of tiles per side when ``grid_pinpoints`` is not given.
        vision_aspect_ratio: ``"anyres_max_N"``: shrink the unpadded grid to at most N tiles' worth.
        min_pixels: Qwen2-VL smart resize: the fewest pixels an image (or video frame) is scaled up to.
        max_pixels: Qwen2-VL smart resize: the most pixels an image (or video frame) is scaled down to.
        aspect_mode: ``"anyres"`` (default): LLaVA-OneVision tiling of a sample's only image.
            ``"pad"``: every image is padded to a square with the mean colour and resized to one
            tile (FastVLM's ``image_aspect_ratio: pad``); no grid, no unpadding.
    """

    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    grid_pinpoints: list[list[int]] | None = None
    max_grid: int = 6
    vision_aspect_ratio: str = "anyres_max_9"
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    aspect_mode: str = "anyres"

    def __post_init__(self) -> None:
        if self.aspect_mode not in ("anyres", "pad"):
            raise ConfigError(f"processing.aspect_mode must be 'anyres' or 'pad', got {self.aspect_mode!r}")

    def pinpoints(self, tile: int) -> list[list[int]]:
        """The candidate resolutions for a tile of side ``tile``."""
        if self.grid_pinpoints is not None:
            return [list(p) for p in self.grid_pinpoints]
        r = range(1, self.max_grid + 1)
        return [[tile * i, tile * j] for i in r for j in r]

    @property
    def max_tiles(self) -> int:
        """N in ``anyres_max_N``."""
        prefix = "anyres_max_"
        if not self.vision_aspect_ratio.startswith(prefix):
            raise ConfigError(f"vision_aspect_ratio must look like 'anyres_max_9', got {self.vision_aspect_ratio!r}")
        return int(self.vision_aspect_ratio[len(prefix):])


@dataclass
class TokensConfig:
    """Special token ids the model and processor agree on."""

    image_token_id: int = 151646
    video_token_id: int = 151647
    eos_token_ids: list[int] = field(default_factory=lambda: [151645, 151643])
    pad_token_id: int = 151643
    chat_template: str = "qwen2"


@dataclass
class VisorConfig:
    """The ``visor:`` section of a zoo card.

    Attributes:
        ca_layers: Layers that run cross-attention before their text-only pass.
        sa_layers: Self-attention candidates.
        configurations: Viable configurations (each a subset of ``sa_layers``); the router chooses
            among these. Empty means ``[sa_layers]``.
        default: Configuration used when ``forward`` gets ``sa_layers=None``; None = all candidates.
        cross_attention_init: ``"copy"`` (q/k/v/o copied from the same layer's self-attention)
            or ``"zero_gate"`` (random projections behind a tanh gate that starts at 0).
        conv_kernel: Kernel of the depth-wise 1-D positional convolution on visual tokens.
        router: Whether the model has a configuration router.
        router_hidden: Hidden width of the router MLP.
        routing_token_id: Token id that marks where the router reads (after each question).
        packing_ratio: VISOR-TR token packing: visual tokens are reduced about this many times
            before the language model (1.0 = off).
    """

    ca_layers: list[int] = field(default_factory=list)
    sa_layers: list[int] = field(default_factory=list)
    configurations: list[list[int]] = field(default_factory=list)
    default: list[int] | None = None
    cross_attention_init: str = "copy"
    conv_kernel: int = 7
    router: bool = False
    router_hidden: int = 256
    routing_token_id: int = 151648
    packing_ratio: float = 1.0

    def __post_init__(self) -> None:
        # What the section alone decides is checked here, when the card is read; whether the
        # layers exist in a decoder of some depth is the plan's check (visorlib.visor.plan.LayerPlan).
        for name in ("ca_layers", "sa_layers"):
            layers = getattr(self, name)
            if len(set(layers)) != len(layers):
                raise ConfigError(f"visor.{name}: repeated layers in {layers}")
        both = sorted(set(self.ca_layers) & set(self.sa_layers))
        if both:
            raise ConfigError(f"visor: layers {both} are both cross-attention and self-attention candidates")
        if self.cross_attention_init not in ("copy", "zero_gate"):
            raise ConfigError(f"visor.cross_attention_init must be 'copy' or 'zero_gate', got {self.cross_attention_init!r}")
        if self.packing_ratio < 1:
            raise ConfigError(f"visor.packing_ratio must be >= 1 (a reduction), got {self.packing_ratio}")


@dataclass
class ModelConfig:
    """Everything needed to build one model: a parsed zoo card.

    Attributes:
        name: Registry name (``"llava-ov-0.5b"``).
        family: Model assembly (``"llava_onevision"``).
        description: One line for ``visorlib list``.
        hub_id: Hugging Face repository holding the reference weights (and tokenizer).
        paper: Where the architecture comes from.
        vision: Vision tower.
        decoder: Language model.
        projector_act: Activation between the projector's two linears.
        use_image_newline: Whether a learned ``image_newline`` ends every grid row.
        processing: Image preprocessing.
        tokens: Special token ids.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash"``.
        visor: The VISOR layer plan; None for a dense model.
        token_reduction: Token reduction applied when a call passes none: a list of method specs
            such as ``[{method: visionzip, keep: 128}]`` (see ``docs/token-reduction.md``; checked
            when the model is built); None for none.
    """

    name: str = "unnamed"
    family: str = "llava_onevision"
    description: str = ""
    hub_id: str | None = None
    paper: str | None = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    projector_act: str = "gelu"
    use_image_newline: bool = True
    processing: ImageProcessingConfig = field(default_factory=ImageProcessingConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    attn_implementation: str = "sdpa"
    visor: VisorConfig | None = None
    token_reduction: list[dict[str, Any]] | None = None

    @property
    def feature_grid_size(self) -> int:
        """Visual tokens per side of one tile as the language model sees them (after packing)."""
        ratio = self.visor.packing_ratio if self.visor is not None else 1.0
        return packed_grid_size(self.vision.grid_size, ratio)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-serialisable dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Strictly parse a dict (unknown keys and wrong types are errors naming ``source``)."""
        return parse_dataclass(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Read a self-contained zoo card (no ``base:``; use :func:`visorlib.get_config` for those)."""
        return cls.from_dict(read_yaml_mapping(path), str(path))

    def tiny(self) -> ModelConfig:
        """The same architecture at test size (hidden 64, 30-px tiles, 256-token vocab).

        Structure is kept (backbone kinds, tied head, newline, anyres rule, VISOR plan; a dense
        decoder drops to 3 layers, a VISOR one keeps its depth) so that a tiny model
        exercises the same code paths as the real one; used by the registry-wide tests and by
        recipes' smoke runs.
        """
        decoder = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4, "num_kv_heads": 2,
                   "max_position_embeddings": 4096}
        overrides: dict[str, Any] = {
            "vision": {"image_size": 30, "patch_size": 6, "hidden_size": 32, "intermediate_size": 37,
                       "num_layers": 2, "num_heads": 4},
            "decoder": decoder,
            "tokens": {"image_token_id": 250, "video_token_id": 251, "eos_token_ids": [255], "pad_token_id": 0},
        }
        if self.visor is None:
            decoder["num_layers"] = 3
        else:  # keep the depth, so the VISOR layer plan still fits
            overrides["visor"] = {"routing_token_id": 252, "router_hidden": 16}
        if self.decoder.mrope_section is not None:
            decoder["mrope_section"] = [2, 3, 3]  # [16, 24, 24]'s proportions, summing to head_dim / 2 = 8
        # The rules are registered with the families, which ``import visorlib`` alone no longer
        # loads; the registry left its loader here (a leaf cannot import it).
        for load in FAMILY_LOADER:
            load()
        rule = TINY_RULES.get(self.family)
        if rule is not None:  # a family whose tower has other geometry (registered with the family)
            overrides = rule(self, overrides)
        return self.with_overrides(overrides, f"tiny({self.name})")

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> ModelConfig:
        """A copy with nested ``overrides`` merged in, validated like a card."""
        return self.from_dict(merge_nested(self.to_dict(), overrides, source), source)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice.

    Plain YAML keeps the last of two ``optim:`` sections without a word, so a recipe edited by
    appending a section would silently lose the first; everything else is ``safe_load``'s.
    """

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}  # key -> the mark where it first appears
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' keys may be overridden, as in YAML
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it as it always has
                break
            if first is not key_node.start_mark:
                line, first = key_node.start_mark.line + 1, first.line + 1
                # No marks: the message stays one line; the lines are in the text.
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {line} (first on line {first}): YAML would "
                    "silently keep only the last one; merge the two or delete one")
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, with a duplicate mapping key an error (:class:`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` a file that must hold a mapping; errors (duplicate keys too) name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'is a folder, not a YAML file' if path.is_dir() else 'no such file'}")
    try:
        data = safe_load_unique(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping, got {type(data).__name__}")
    return data


def packed_grid_size(grid: int, ratio: float) -> int:
    """Side of a tile's token grid after VISOR-TR packing by ``ratio`` (1.0: unchanged).

    The grid is resized to ``2 * side`` and folded 2x2 into channels, so ``side**2`` is the
    nearest whole grid to ``grid**2 / ratio``.
    """
    if ratio < 1:
        raise ConfigError(f"packing ratio must be >= 1 (a reduction), got {ratio}")
    if ratio == 1:
        return grid
    return max(1, round(grid / ratio**0.5))


def merge_nested(base: dict[str, Any], update: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; unknown keys are errors."""
    out = dict(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{source}: unknown key {prefix + key!r} (known: {', '.join(sorted(base))})")
        # An empty mapping in the base is free-form (e.g. a recipe's model overrides): replace it.
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            out[key] = merge_nested(base[key], value, source, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def parse_dataclass(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix + unknown[0]!r} in {cls.__name__} (known: {', '.join(sorted(names))})"
        )
    kwargs = {key: _coerce(hints[key], value, source, prefix + key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by a __post_init__ check: name the file
        raise ConfigError(f"{source}: {err}") from err


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    """Check ``value`` against type ``hint`` (ints are accepted where floats are expected)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: key {key!r} must not be null")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `1e-3` as a string (it wants `1.0e-3`); accept finite numbers.
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{source}: key {key!r} must be a number (e.g. 0.001, 1.0e-3 or 1e-3), got {value!r}")
        return number
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{source}: key {key!r} must be int, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{source}: key {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
