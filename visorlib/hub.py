"""Checkpoints: finding them (local or Hub), reading safetensors, saving atomically.

A visorlib checkpoint is a folder with ``visorlib.json`` (format version + the model card) and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``). A Hugging Face
LLaVA-OneVision checkpoint (``config.json`` with ``model_type``) loads through the converter in
:mod:`visorlib.models.llava_onevision.convert`. Downloads go through ``huggingface_hub`` so its cache, ``HF_HOME`` and
``HF_HUB_OFFLINE`` behave as users expect. Weights are only ever read from safetensors: no
pickle is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

VISORLIB_CONFIG = "visorlib.json"
FORMAT_VERSION = 1
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model (names the file or keys)."""


def looks_local(value: str | os.PathLike) -> bool:
    """Whether a checkpoint or tokenizer source is meant as a local path, not a Hub id ``owner/name``.

    Used so that a mistyped folder fails at once with a local error, instead of being sent to the
    Hub (where a missing network means tens of seconds of retries and an error about a repo).
    """
    text = os.fspath(value)
    if isinstance(value, Path) or text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1:
        return True
    # "runs/tok" next to an existing "runs/" folder, or a file name, is a path, not "owner/name".
    return text.endswith(".json") or Path(text.split("/")[0]).is_dir()


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder holding the checkpoint: ``path_or_hub_id`` itself, or a Hub snapshot.

    Hub ids are fetched with ``huggingface_hub.snapshot_download`` (configs, tokenizer and
    safetensors only), which serves from the local cache and honours ``HF_HUB_OFFLINE=1``.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains it")
    repo_id = str(path_or_hub_id)
    if looks_local(path_or_hub_id):
        first = Path(repo_id.split("/")[0])
        why = f" ({first}/ is a local folder, so this is read as a path)" if repo_id.count("/") == 1 and first.is_dir() else ""
        raise CheckpointError(f"{repo_id!r} is neither an existing folder nor a Hugging Face repo id (owner/name){why}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub or its local cache "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
        ) from err


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, naming it in any error."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} not found") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards its index names)."""
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        return [_shard_path(folder, index, name) for name in sorted(set(weight_map.values()))]
    single = folder / SAFETENSORS
    if single.exists():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(pickles)}: pickled weights are not loaded, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"no safetensors weights in {folder}{hint}")


def _shard_path(folder: Path, index: Path, name: Any) -> Path:
    """The shard ``name`` of ``index``, refused unless it is a plain file name inside ``folder``.

    An index is data from whoever published the checkpoint: an entry such as
    ``../../other/model.safetensors`` must not make us read files outside the checkpoint.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {name!r}")
    shard = (folder / name).resolve()
    if Path(name).is_absolute() or not shard.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index}: shard {name!r} lies outside the checkpoint folder {folder}; refused")
    return folder / name


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """Read and check ``visorlib.json``: the format marker, the version and the card.

    Raises:
        CheckpointError: naming the file when it is not a visorlib config, or when it was written by
            a newer visorlib (a newer format may mean something this version would silently misread).
    """
    meta = read_json(path)
    if meta.get("format") != "visorlib" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not a visorlib checkpoint config (needs format: visorlib and a config)")
    version = meta.get("version", 1)  # files from before the version field are format 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this visorlib reads "
            f"(version {FORMAT_VERSION}); upgrade visorlib to load it"
        )
    return meta


def read_safetensors(
    files: list[Path], dtype: torch.dtype | None = None, origins: dict[str, Path] | None = None
) -> dict[str, torch.Tensor]:
    """Load every tensor of ``files`` (cast floating tensors to ``dtype`` when given).

    Args:
        files: The safetensors files.
        dtype: Cast floating-point tensors to this dtype.
        origins: Filled with the file each key came from, so later errors can name it.
    """
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"weight file {file} is missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state[key] = tensor
                    if origins is not None:
                        origins[key] = file
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} is corrupt or truncated: {err}") from err
    return state


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "floating-point"
    return "complex" if dtype.is_complex else "integer"


def load_state_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, origins: dict[str, Any] | None = None
) -> None:
    """Load ``state`` into ``model`` (possibly on the meta device), strictly.

    Args:
        model: The model to fill.
        state: Tensors keyed by the model's names.
        source: Named in errors (the checkpoint folder).
        origins: The file each key of ``state`` came from (named in dtype errors when known).

    Raises:
        CheckpointError: naming missing or unexpected keys, a tensor whose shape differs, or one
            whose kind (floating-point, integer, bool) differs from the model's parameter.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(f"{key}: checkpoint shape {list(state[key].shape)} != model shape {list(expected[key].shape)}")
            break
    for key in sorted(set(expected) & set(state)):
        # Checked before loading: an int/bool tensor would otherwise become a parameter that cannot
        # hold gradients, or be cast silently (bool -> 0/1 weights), deep inside load_state_dict.
        want, got = _kind(expected[key].dtype), _kind(state[key].dtype)
        if want != got:
            where = (origins or {}).get(key, source)
            problems.append(f"{key} in {where} holds {got} values ({state[key].dtype}) but the model's "
                            f"parameter is {want} ({expected[key].dtype})")
            break
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    dtype = next(iter(expected.values())).dtype
    model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True, assign=True
    )


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def _default_mode(path: str | os.PathLike) -> None:
    """Give a temporary file the mode a plain ``open`` would (0644 under umask 022): tempfile
    creates 0600, which would make exported checkpoints unreadable to other users."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def _atomic_file(path: Path) -> Iterator[str]:
    """A temporary name beside ``path`` to write to; on success it is fsynced, given the default
    mode and renamed over ``path``, so a crash leaves either the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` atomically."""
    with _atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON over ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` over ``path`` atomically (streamed to disk: no second copy in memory)."""
    with _atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)


def _stale_shards(folder: Path) -> set[Path]:
    """The shard files a previous sharded save left (named by its index), to delete once replaced."""
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return set()
    try:
        return set(weight_files(folder))
    except CheckpointError:  # a broken old index: its shards cannot be named, leave them
        return set()


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Save ``state`` as ``model.safetensors``, or as shards plus their index when it is larger
    than ``max_shard_size``; returns the file names written.

    How to cut the shards (and keep tensors that share storage together) is
    ``huggingface_hub.split_torch_state_dict_into_shards``, the rule transformers' own
    ``save_pretrained`` follows, so the files and index are what the Hub and its loaders expect.
    What huggingface_hub's ``save_torch_state_dict`` would not give is visorlib's atomic writes:
    each shard, then the index, goes to a temporary name and is renamed into place, and the
    files of the previous save that the new one does not name are removed only after the new
    index is in place. A crash therefore leaves the old checkpoint or the new one, never a mix.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    metadata = {"format": "pt", "producer": "visorlib"}
    old = _stale_shards(folder) | {folder / SAFETENSORS}
    if not split.is_sharded:
        (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)
        atomic_save_safetensors(state, folder / SAFETENSORS, metadata)
    else:
        for name, keys in split.filename_to_tensors.items():
            atomic_save_safetensors({k: state[k] for k in keys}, folder / name, metadata)
        atomic_write_json(folder / SAFETENSORS_INDEX,
                          {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename})
    written = sorted(split.filename_to_tensors)
    for stale in old - {folder / name for name in written}:
        stale.unlink(missing_ok=True)
    return written + ([SAFETENSORS_INDEX] if split.is_sharded else [])


def write_checkpoint(
    state: dict[str, torch.Tensor], cfg, directory: str | os.PathLike, extra_files: dict[str, bytes] | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a visorlib checkpoint folder: weights first, config last, each atomically.

    An interrupted save therefore never leaves a folder that looks complete but mixes old and new
    files (the trainer's consolidated export uses this too).

    Args:
        state: The tensors to save.
        cfg: The :class:`ModelConfig` written into ``visorlib.json``.
        directory: The folder (created if needed).
        extra_files: Other files by name (tokenizer, model card), written after the weights and
            before ``visorlib.json``.
        max_shard_size: Above this the weights are split into shards with an index
            (``"5GB"``, as transformers; an int is bytes).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(state, folder, max_shard_size)
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(folder / name, data)
    atomic_write_json(folder / VISORLIB_CONFIG, {"format": "visorlib", "version": FORMAT_VERSION, "config": cfg.to_dict()})
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_files(model: nn.Module, tokenizer: Any = None) -> dict[str, bytes]:
    """The tokenizer files to save beside ``model``'s weights (empty when it has no tokenizer).

    Args:
        model: A visorlib model; its ``checkpoint_dir`` (the folder it was loaded from) is used
            when ``tokenizer`` is None.
        tokenizer: A :class:`visorlib.processing.Tokenizer`, or a processor holding one.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor -> its tokenizer
    if tokenizer is not None:
        if not hasattr(tokenizer, "backend"):
            raise TypeError(f"tokenizer must be a visorlib Tokenizer or a processor, got {type(tokenizer).__name__}")
        settings = {k: v for k, v in (("eos_token", tokenizer.eos_token), ("pad_token", tokenizer.pad_token)) if v}
        return {"tokenizer.json": tokenizer.backend.to_str().encode(),
                "tokenizer_config.json": json.dumps(settings, indent=2).encode()}
    folder = getattr(model, "checkpoint_dir", None)
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        return {}
    return {name: (Path(folder) / name).read_bytes() for name in TOKENIZER_FILES if (Path(folder) / name).is_file()}


def render_model_card(model: nn.Module, repo_id: str | None, files: list[str]) -> str:
    """A Hugging Face model card (``README.md``) describing a visorlib checkpoint."""
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    front = ["---", "library_name: visorlib", "tags:", "- visorlib", "- vision-language"]
    if cfg.visor is not None:
        front.append("- visor")
    if cfg.hub_id:
        front.append(f"base_model: {cfg.hub_id}")
    front.append("---")
    plan = ""
    if cfg.visor is not None:
        v = cfg.visor
        plan = (f"\n\nVISOR layer plan: cross-attention layers {v.ca_layers}, self-attention candidates "
                f"{v.sa_layers}, router {'on' if v.router else 'off'}, packing ratio {v.packing_ratio}.")
    source = repo_id or "path/to/this/folder"
    return "\n".join(front) + f"""

# {cfg.name}

{cfg.description or "A visorlib vision-language model."}

- family: `{cfg.family}`, {params / 1e6:.1f} M parameters
- decoder: {cfg.decoder.num_layers} layers, width {cfg.decoder.hidden_size}; vision tower: `{cfg.vision.kind}`
- files: {", ".join(f"`{f}`" for f in files)}{plan}

Load it with visorlib (`pip install visorlib`):

```python
import visorlib

model = visorlib.from_pretrained("{source}")
processor = visorlib.processor_for(model)
```
"""


class PretrainedMixin:
    """``save_pretrained`` / ``push_to_hub`` for models that carry a ``cfg`` (:class:`ModelConfig`)."""

    def save_pretrained(
        self, directory: str | os.PathLike, tokenizer: Any = None, model_card: bool = False, repo_id: str | None = None,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write a checkpoint folder that :func:`visorlib.from_pretrained` loads back.

        ``visorlib.json`` and ``model.safetensors`` always; ``tokenizer.json`` (+
        ``tokenizer_config.json``) when the model has a tokenizer: the one passed, else the one in
        the folder the model was loaded from (``model.checkpoint_dir``). A model built with random
        weights has none unless you pass it.

        Args:
            directory: The folder (created if needed).
            tokenizer: A :class:`~visorlib.processing.Tokenizer` or a processor (``processor_for(model)``).
            model_card: Also write a ``README.md`` model card (:meth:`push_to_hub` always does).
            repo_id: The Hub repository the card's loading example names.
            max_shard_size: Larger weights are written as shards plus ``model.safetensors.index.json``.
        """
        state = self.state_dict()
        if any(t.is_meta for t in state.values()):
            raise CheckpointError("cannot save a model built on the meta device: it has no weights yet")
        files = tokenizer_files(self, tokenizer)
        if model_card:
            names = [SAFETENSORS, *files, VISORLIB_CONFIG]
            files["README.md"] = render_model_card(self, repo_id, names).encode()
        return write_checkpoint(state, self.cfg, directory, files, max_shard_size)

    def push_to_hub(
        self, repo_id: str, private: bool = False, commit_message: str = "Upload visorlib model", tokenizer: Any = None
    ) -> str:
        """Save (weights, config, tokenizer, model card) to a temporary folder and upload it to the Hub.

        Args:
            repo_id: ``owner/name`` of the Hub repository (created if missing).
            private: Create the repository as private.
            commit_message: The upload's commit message.
            tokenizer: As in :meth:`save_pretrained`.

        Returns:
            The commit URL.

        Raises:
            CheckpointError: naming the Hub and the repository when it cannot be reached or refuses.
        """
        from huggingface_hub import HfApi, constants

        with tempfile.TemporaryDirectory() as tmp:
            # Saved first, so a model that cannot be saved fails before any network traffic.
            self.save_pretrained(tmp, tokenizer=tokenizer, model_card=True, repo_id=repo_id)
            try:
                api = HfApi()
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
            except Exception as err:  # noqa: BLE001 - httpx, ssl, socket and Hub errors all mean "not pushed"
                raise CheckpointError(
                    f"could not push to the Hugging Face Hub repo {repo_id!r} at {constants.ENDPOINT} "
                    f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {type(err).__name__}: {err}"
                ) from err
        return str(info)
