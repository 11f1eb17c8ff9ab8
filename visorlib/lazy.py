"""Names a package exports without importing them until first use (PEP 562).

``import visorlib`` must not import torch (``visorlib --help`` answers at once, and a Ctrl-C while
torch loads reaches the command's own handler), so the package and its heavier subpackages list
their public names with the submodule that defines each, and resolve a name on first access.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], submodules: bool = False
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``exports`` map a public name to its submodule.

    Args:
        package: The package's ``__name__``.
        exports: ``public name -> submodule`` (relative to ``package``).
        submodules: Also resolve a submodule used as an attribute (``visorlib.zoo``) without its
            own import statement.

    A resolved name is stored in the package's namespace, so later look-ups never come back here.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        elif submodules:
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def moved_module(old: str, new: str, removal: str) -> Callable[[str], Any]:
    """``__getattr__`` of a module kept at an old path: every name comes from ``new``, with a DeprecationWarning.

    Args:
        old: The old module's ``__name__``.
        new: The module that holds the code now.
        removal: The visorlib version that deletes the old path.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        import warnings

        warnings.warn(f"{old}.{name} moved to {new}.{name}; import it from there ({old} is removed in visorlib "
                      f"{removal})", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
