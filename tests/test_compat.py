"""Import paths from before the family-folder layout still import, warn, and give the same objects."""

from __future__ import annotations

import importlib
import sys

import pytest

from visorlib.compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    if hasattr(module, "__path__") and not hasattr(new, "__path__"):  # a package view of a plain module
        assert all(getattr(module, k) is v for k, v in vars(new).items() if not k.startswith("__"))
    else:
        assert module is new


def test_old_names_users_imported_resolve_to_the_same_objects():
    import visorlib
    from visorlib.models.llava_onevision import LlavaOnevisionProcessor
    from visorlib.visor import LayerPlan

    for name in ("visorlib.blocks", "visorlib.convert"):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning):
        from visorlib.blocks import LayerPlan as OldLayerPlan
    with pytest.warns(DeprecationWarning):
        from visorlib.convert import config_from_hf  # noqa: F401 - importable under the old name
    assert OldLayerPlan is LayerPlan
    assert visorlib.LlavaOnevisionProcessor is LlavaOnevisionProcessor
