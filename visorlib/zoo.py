"""The model zoo: named cards, ``build`` and ``from_pretrained``.

Cards live in ``zoo/*.yaml`` (one per named model, strictly validated). ``build(name)`` makes the
architecture a card describes; ``pretrained`` adds weights from the Hub or a folder. Building on
the meta device costs no memory, so a 7B card can be inspected on a laptop.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, ModelConfig, VisorConfig, merge_nested, read_yaml_mapping
from .hub import (
    VISORLIB_CONFIG,
    CheckpointError,
    load_state_into,
    read_checkpoint_meta,
    read_json,
    read_safetensors,
    resolve_checkpoint,
    weight_files,
)
from .models import family_for_hf, family_of, init_weights, model_class
from .registry import resolve
from .visor import visorize as visorize_plan
from .visor.plan import LayerPlan


def zoo_dir() -> Path:
    """Folder of the zoo cards (``VISORLIB_ZOO`` overrides it)."""
    if os.environ.get("VISORLIB_ZOO"):
        return Path(os.environ["VISORLIB_ZOO"])
    return Path(__file__).resolve().parent / "zoo"


@cache
def _cards(folder: str) -> dict[str, Path]:
    cards = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        cards[path.stem] = path
    return cards


def list_models(pattern: str = "*") -> list[str]:
    """Names of the zoo cards matching a shell-style ``pattern`` (``"*visor*"``)."""
    return [name for name in _cards(str(zoo_dir())) if fnmatch.fnmatch(name, pattern)]


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The parsed card ``name`` with nested ``overrides`` merged (``decoder={"num_layers": 2}``)."""
    cards = _cards(str(zoo_dir()))
    if name not in cards:
        close = difflib.get_close_matches(name, list(cards), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (known: {', '.join(cards)})")
    cfg = ModelConfig.from_dict(_card_dict(name, cards, ()), str(cards[name]))
    if cfg.name != name:
        raise ConfigError(f"{cards[name]}: card name {cfg.name!r} must equal the file name {name!r}")
    return resolve(cfg.with_overrides(overrides, f"overrides for {name}") if overrides else cfg)


def _card_dict(name: str, cards: dict[str, Path], chain: tuple[str, ...]) -> dict[str, Any]:
    """A card as a dict, with ``base: other-card`` resolved (the card's keys override the base's)."""
    path = cards[name]
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if base in chain or base == name:
        raise ConfigError(f"{path}: circular base chain {' -> '.join((*chain, name, base))}")
    if base not in cards:
        raise ConfigError(f"{path}: base card {base!r} does not exist")
    # Expand the base to every field (defaults included) so the card may set any of them.
    full_base = ModelConfig.from_dict(_card_dict(base, cards, (*chain, name)), str(cards[base])).to_dict()
    return merge_nested(full_base, data, str(path))


def instantiate(
    cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None, init: bool = True
) -> nn.Module:
    """Construct the model of ``cfg``: on ``"meta"`` no memory is used and nothing is initialised."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if str(device) == "meta" or not init:
        return model
    model = model.to_empty(device=device or "cpu")
    init_weights(model)
    model.language_model.init_blocks()  # VISOR blocks start from the dense weights they sit beside
    return model


def build(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the model a zoo card describes.

    Args:
        name: Card name, e.g. ``"llava-ov-0.5b"`` (see :func:`list_models`).
        pretrained: None/False for random weights; True for the card's ``hub_id``; or a Hub id /
            local folder to load weights from.
        device: Where the weights live; ``"meta"`` builds shapes only (free, for inspection).
        dtype: Parameter dtype (default float32).
        **overrides: Nested card fields to change, e.g. ``decoder={"num_layers": 2}``.

    Returns:
        The model, in eval mode.
    """
    cfg = get_config(name, **overrides)
    if not pretrained:
        return instantiate(cfg, device, dtype).eval()
    source = cfg.hub_id if pretrained is True else pretrained
    packaged = zoo_dir() / "weights" / name
    if pretrained is True and (packaged / VISORLIB_CONFIG).exists():
        source = packaged  # weights shipped inside the package beside the card (offline)
    if source is None:
        raise ConfigError(f"{name}: pretrained=True but the card names no hub_id")
    folder = resolve_checkpoint(source)
    if cfg.visor is not None and not (folder / VISORLIB_CONFIG).exists():
        # A dense reference checkpoint: load it, then add freshly initialised VISOR blocks.
        model = instantiate(dataclasses.replace(cfg, visor=None), "meta", dtype)
        load_weights(model, folder)
        model = dense_to_visor(model.to(device or "cpu"), cfg.visor, source, name)
    else:
        model = instantiate(cfg, "meta", dtype)
        load_weights(model, folder)
        model = model.to(device or "cpu")
    model.checkpoint_dir = folder
    return model.eval()


def dense_to_visor(model: nn.Module, visor: VisorConfig, source: Any, name: str | None = None,
                   warn: bool = True) -> nn.Module:
    """The one dense -> VISOR conversion (:func:`build` and the trainer both call it).

    ``model`` holds dense weights loaded from ``source``; it gets the plan's VISOR blocks,
    initialised from those weights (:func:`visorlib.visor.visorize`), in place. With ``warn`` it
    says that the blocks are untrained — a training run, which is the fine-tuning asked for, passes
    ``warn=False``.
    """
    model = visorize_plan(model, visor, warn=False)
    if warn:
        warnings.warn(
            f"{name or model.cfg.name}: loaded the dense weights of {source}; the VISOR blocks (cross-attention, "
            "router, packing projector) are freshly initialised and untrained: fine-tune before trusting its answers",
            stacklevel=3,
        )
    return model


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load a visorlib or Hugging Face checkpoint folder into ``model`` (strict)."""
    own = folder / VISORLIB_CONFIG
    if own.exists():
        read_checkpoint_meta(own)  # a newer format must not be read as this one
    origins: dict[str, Path] = {}
    state = read_safetensors(weight_files(folder), origins=origins)
    if not own.exists():
        # Converters rename keys but keep the tensor objects: follow them to name files in errors.
        file_of = {id(tensor): origins[key] for key, tensor in state.items()}
        try:
            state = family_of(model.cfg).convert(state, model.cfg)
        except CheckpointError as err:  # the converter knows the layout, not the folder: name it
            raise CheckpointError(f"{folder}: {err}") from err
        origins = {key: file_of.get(id(tensor), folder) for key, tensor in state.items()}
    load_state_into(model, state, str(folder), origins)


def _layer_count_hint(folder: Path, cfg: ModelConfig) -> str:
    """``; its weights hold 8 decoder layers ...`` when the weights disagree with ``decoder.num_layers``."""
    from safetensors import safe_open

    layers = set()
    try:
        for file in weight_files(folder):
            with safe_open(str(file), framework="pt") as handle:  # key names only, no tensor is read
                layers |= {key.split(".")[2] for key in handle.keys() if key.startswith("decoder.layers.")}
    except Exception:  # noqa: BLE001 - only a hint; the weights' own errors come when they are loaded
        return ""
    if layers and len(layers) != cfg.decoder.num_layers:
        return (f"; its weights hold {len(layers)} decoder layers but decoder.num_layers is "
                f"{cfg.decoder.num_layers}: set decoder.num_layers to {len(layers)}")
    return ""


def read_checkpoint_config(folder: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a visorlib or Hugging Face checkpoint folder."""
    own = folder / VISORLIB_CONFIG
    if own.exists():
        cfg = ModelConfig.from_dict(read_checkpoint_meta(own)["config"], str(own))
        if cfg.visor is not None:
            # Checked here, where the file is known: otherwise the model's constructor reports an
            # out-of-range visor.sa_layers naming neither the file nor the key that was edited.
            try:
                LayerPlan(cfg.decoder.num_layers, cfg.visor)
            except ConfigError as err:
                raise ConfigError(f"{own}: {err}{_layer_count_hint(folder, cfg)}") from None
        return cfg
    hf = folder / "config.json"
    if not hf.exists():
        raise CheckpointError(f"{folder} has neither {VISORLIB_CONFIG} nor config.json")
    hf_config = read_json(hf)
    family = family_for_hf(hf_config.get("model_type"), str(hf))
    try:
        return resolve(family.config_from_hf(hf_config, str(hf), folder.name))
    except ConfigError as err:
        if str(hf) in str(err):
            raise
        raise ConfigError(f"{hf}: {err}") from err  # a value check of the built config: name the file


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Load a visorlib checkpoint, or a Hugging Face checkpoint of a supported family.

    The family comes from ``config.json``'s ``model_type``: LLaVA-OneVision, Qwen2-VL, FastVLM
    (transformers' ``fast_vlm`` and Apple's original ``llava_qwen2``).

    Args:
        path_or_hub_id: A local folder or a Hub repo id (``"llava-hf/llava-onevision-qwen2-0.5b-ov-hf"``).
        device: Target device.
        dtype: Parameter dtype (default float32, whatever the file stores).
        **overrides: Card fields to change that do not alter weight shapes (``attn_implementation="eager"``).
    """
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = read_checkpoint_config(folder)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    model = instantiate(cfg, "meta", dtype)
    load_weights(model, folder)
    model.checkpoint_dir = folder
    return model.to(device or "cpu").eval()


def processor_for(model: nn.Module, tokenizer_source: str | os.PathLike | None = None):
    """The processor (images + text -> model inputs) that matches ``model``.

    The tokenizer (``tokenizer.json``) comes from, in order:

    1. ``tokenizer_source`` if given: a folder, the file itself, or a Hub id. Any failure is raised;
       a value that looks like a path (``./tok``, ``runs/tok`` beside a ``runs/`` folder, one
       without ``owner/name`` form) is never looked up on the Hub.
    2. The folder the model was loaded from (``model.checkpoint_dir``), when it holds one. A
       corrupt ``tokenizer.json`` there raises :class:`CheckpointError`.
    3. The card's ``hub_id``: through the Hub (or its cache) for a model built without a
       checkpoint; from the local Hub cache only for a model loaded from a folder, so a saved
       folder without a tokenizer falls back at once instead of waiting on network retries.

    A model with none of these gets a processor that handles pixels only, with a warning.

    Args:
        model: A visorlib model (anything with ``.cfg``).
        tokenizer_source: A folder, ``tokenizer.json`` file or Hub id.

    Raises:
        FileNotFoundError: ``tokenizer_source`` is a local path that does not exist.
        CheckpointError: A tokenizer file that exists is corrupt.
    """
    make = family_of(model.cfg).processor
    if tokenizer_source is not None:
        try:
            return make(model.cfg, tokenizer_source)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"tokenizer_source={os.fspath(tokenizer_source)!r}: {err}") from err
    folder = getattr(model, "checkpoint_dir", None)
    errors = []
    if folder is not None:
        if (Path(folder) / "tokenizer.json").is_file():
            try:
                return make(model.cfg, folder)
            except ValueError as err:  # a tokenizer that disagrees with the card's token ids
                errors.append(f"{folder}: {err}")
        else:
            errors.append(f"{folder} has no tokenizer.json")
    hub_id = model.cfg.hub_id
    if hub_id is not None:
        try:
            return make(model.cfg, hub_id, local_files_only=folder is not None)
        except (OSError, ValueError, RuntimeError) as err:
            errors.append(f"{hub_id}{' (local Hub cache only)' if folder is not None else ''}: {err}")
    warnings.warn(
        "no tokenizer found for this model (" + ("; ".join(errors) or "no checkpoint or hub_id") + "); "
        "the processor will prepare images only",
        stacklevel=2,
    )
    return make(model.cfg, None)


def visorize(model: nn.Module, visor: VisorConfig | dict | str, warn: bool = True) -> nn.Module:
    """Turn a dense model into a VISOR model (in place) and return it: :func:`visorlib.visor.visorize`,
    which also accepts the name of a VISOR zoo card whose plan to use (``"visor-llava-ov-0.5b"``)."""
    if isinstance(visor, str):
        card = get_config(visor)
        if card.visor is None:
            raise ConfigError(f"zoo card {visor!r} has no visor section")
        visor = card.visor
    return visorize_plan(model, visor, warn)


def flops(model_or_name: Any, *args: Any, **kwargs: Any):
    """``visorlib.flops``: :func:`visorlib.flops.flops` of a built model, a config or a zoo card *name*.

    The name is resolved here, above the zoo, so the cost model itself never imports the zoo.
    The other arguments (``n_visual``, ``n_text``, ``tiles``, ``sa_layers``, ``logits_for``,
    ``token_reduction``) are those of :func:`visorlib.flops.flops`.

    Example::

        visorlib.flops("llava-ov-0.5b", n_visual=7371, n_text=64, tiles=10, token_reduction={"method": "visionzip"})
    """
    from .flops import flops as cost

    return cost(get_config(model_or_name) if isinstance(model_or_name, str) else model_or_name, *args, **kwargs)
