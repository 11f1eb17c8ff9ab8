"""visorlib: VISOR (Vision On Request) vision-language models in pure PyTorch.

Quick start::

    import visorlib
    visorlib.list_models()
    model = visorlib.build("llava-ov-0.5b", pretrained=True)
    processor = visorlib.processor_for(model)

The names below load on first use (PEP 562): ``import visorlib`` itself imports neither torch nor
the model code, so ``visorlib --help`` answers at once and a Ctrl-C while torch loads reaches the
command's own handler (one line, exit 130) instead of printing an import traceback.
"""

from __future__ import annotations

import importlib
import sys
import types

from .config import FAMILY_LOADER as _FAMILY_LOADER
from .lazy import lazy_exports

__version__ = "0.1.0"

# The registry is filled by importing the families (visorlib.models registers them). Nothing below
# the package's top may import them (layers point one way), so the registry is handed the loader
# from here, and calls it on its first look-up.
_FAMILY_LOADER.append(lambda: importlib.import_module(".models", __name__))

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "hub",
    "ConfigError": "config",
    "InputError": "models",
    "LlavaOnevisionProcessor": "models.llava_onevision",
    "ModelConfig": "config",
    "Qwen2VLProcessor": "models.qwen2_vl",
    "build": "zoo",
    "flops": "zoo",  # the name-resolving wrapper of visorlib.flops.flops
    "from_pretrained": "zoo",
    "get_config": "zoo",
    "list_models": "zoo",
    "processor_for": "zoo",
    "visorize": "zoo",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=True)


class _Package(types.ModuleType):
    """``visorlib.flops`` is the function (:func:`visorlib.zoo.flops`), also once the submodule of that name is imported.

    Importing a submodule sets it as an attribute of its package. Lazily the submodule may be
    imported at any time, so that binding is refused here and the name keeps resolving through
    ``__getattr__`` to the name-resolving wrapper in the zoo.
    """

    def __setattr__(self, name: str, value) -> None:
        if name == "flops" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
