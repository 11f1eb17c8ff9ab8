"""Checkpoints: finding them (local or Hub), reading safetensors, saving atomically.

A visorlib checkpoint is a folder with ``visorlib.json`` (format version + the model card) and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``). A Hugging Face
LLaVA-OneVision checkpoint (``config.json`` with ``model_type``) loads through the converter in
:mod:`visorlib.convert`. Downloads go through ``huggingface_hub`` so its cache, ``HF_HOME`` and
``HF_HUB_OFFLINE`` behave as users expect. Weights are only ever read from safetensors: no
pickle is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
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
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{repo_id!r} is neither an existing folder nor a Hugging Face repo id (owner/name)")
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
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SAFETENSORS
    if single.exists():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(pickles)}: pickled weights are not loaded, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"no safetensors weights in {folder}{hint}")


def read_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load every tensor of ``files`` (cast floating tensors to ``dtype`` when given)."""
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
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} is corrupt or truncated: {err}") from err
    return state


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` (possibly on the meta device), strictly.

    Raises:
        CheckpointError: naming missing or unexpected keys, or a tensor whose shape differs.
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
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    dtype = next(iter(expected.values())).dtype
    model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True, assign=True
    )


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=2)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` to a temporary name, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_checkpoint(state: dict[str, torch.Tensor], cfg, directory: str | os.PathLike) -> Path:
    """Write a visorlib checkpoint folder: weights first, config last, each atomically.

    An interrupted save therefore never leaves a folder that looks complete but mixes old and new
    files (the trainer's consolidated export uses this too).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)
    atomic_save_safetensors(state, folder / SAFETENSORS, {"format": "pt", "producer": "visorlib"})
    atomic_write_json(folder / VISORLIB_CONFIG, {"format": "visorlib", "version": FORMAT_VERSION, "config": cfg.to_dict()})
    return folder


class PretrainedMixin:
    """``save_pretrained`` / ``push_to_hub`` for models that carry a ``cfg`` (:class:`ModelConfig`)."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``visorlib.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        state = self.state_dict()
        if any(t.is_meta for t in state.values()):
            raise CheckpointError("cannot save a model built on the meta device: it has no weights yet")
        return write_checkpoint(state, self.cfg, directory)

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str = "Upload visorlib model") -> str:
        """Save to a temporary folder and upload it to the Hub; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(info)
