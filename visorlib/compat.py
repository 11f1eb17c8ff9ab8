"""Old import paths from before the family-folder layout keep working, with a deprecation warning.

visorlib 0.1 had ``visorlib.blocks``, ``visorlib.backbones``, ``visorlib.convert*``,
``visorlib.layers``, ``visorlib.cache`` and ``visorlib.models.{executor,visor,multimodal}``; their
code now lives in ``visorlib/visor/``, ``visorlib/modules/``, ``visorlib/registry.py`` and the family
folders ``visorlib/models/<family>/``. Rather than keep a shim file at every old path (which would
hide the new shape), one import hook maps each old module name to the module that holds its code
now: ``import visorlib.blocks`` returns :mod:`visorlib.visor` itself, so ``isinstance`` checks and
monkey-patches see the same objects (``visorlib.backbones``, once a package and now the plain module
:mod:`visorlib.registry`, is a package view of the registry's names). Names that were merged away (``VisorMixin``,
``MultimodalMixin``) are not recreated.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: Old module name -> the module that holds its code now.
MOVED = {
    "visorlib.blocks": "visorlib.visor",
    "visorlib.blocks.plan": "visorlib.visor.plan",
    "visorlib.blocks.cross_attention": "visorlib.visor.cross_attention",
    "visorlib.blocks.router": "visorlib.visor.router",
    "visorlib.blocks.token_packing": "visorlib.visor.token_packing",
    "visorlib.backbones": "visorlib.registry",
    "visorlib.backbones.qwen2": "visorlib.modules.qwen2",
    "visorlib.backbones.siglip": "visorlib.models.llava_onevision.siglip",
    "visorlib.backbones.fastvit": "visorlib.models.fast_vlm.fastvit",
    "visorlib.backbones.qwen2_vl": "visorlib.models.qwen2_vl.vision",
    "visorlib.convert": "visorlib.models.llava_onevision.convert",
    "visorlib.convert_qwen2_vl": "visorlib.models.qwen2_vl.convert",
    "visorlib.convert_fastvlm": "visorlib.models.fast_vlm.convert",
    "visorlib.layers": "visorlib.modules.layers",
    "visorlib.cache": "visorlib.modules.cache",
    "visorlib.models.executor": "visorlib.visor.executor",
    "visorlib.models.visor": "visorlib.visor",
    "visorlib.models.multimodal": "visorlib.models.base",
    "visorlib.processing.qwen2_vl": "visorlib.models.qwen2_vl.processor",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        if hasattr(module, "__path__") or not any(old.startswith(spec.name + ".") for old in MOVED):
            return module
        # An old package whose code is now one plain module (visorlib.backbones -> registry): a
        # package view of that module's names, so its old submodules stay importable beneath it.
        package = types.ModuleType(spec.name, module.__doc__)
        package.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        package.__path__ = []
        return package

    def exec_module(self, module) -> None:  # the target module is already executed
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old visorlib module name to its new module (see :data:`MOVED`)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; import it from there (the old path will be removed)",
                      DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (called by ``import visorlib``)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
