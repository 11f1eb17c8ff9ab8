"""Old import paths: the pre-family-folder ones are gone (listed in CHANGELOG.md); issue 20's moves warn.

The import hook that redirected the 0.1 module names was dropped in issue 20: each old name now
fails to import, and the changelog says where its code went. Modules moved in issue 20 keep an
explicit shim that warns with the version removing it, and gives the same objects.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

CHANGELOG = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
DROPPED = dict(re.findall(r"\| `(visorlib\.[\w.]+)` \| `(visorlib\.[\w.]+)` \|", CHANGELOG))


def test_the_changelog_lists_the_dropped_module_paths():
    assert len(DROPPED) == 19 and "visorlib.blocks" in DROPPED and "visorlib.compat" not in sys.modules


@pytest.mark.parametrize("old", sorted(DROPPED))
def test_a_dropped_module_path_fails_and_its_new_home_imports(old):
    sys.modules.pop(old, None)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    importlib.import_module(DROPPED[old])


@pytest.mark.parametrize("old, new, name", [("visorlib.train.data", "visorlib.data.conversations", "collate"),
                                            ("visorlib.train.runlock", "visorlib.data.runlock", "RunLock")])
def test_a_module_moved_in_issue_20_warns_and_gives_the_same_object(old, new, name):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{new}\.{name}.*removed in visorlib 0\.3"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_names_kept_at_their_old_paths_are_the_same_objects():
    import visorlib
    from visorlib.data.specs import DatasetSpec
    from visorlib.models.base import Embedded as OldEmbedded
    from visorlib.profiling import human as old_human
    from visorlib.train.recipe import DatasetSpec as OldDatasetSpec
    from visorlib.utils import human
    from visorlib.visor import Embedded

    assert OldDatasetSpec is DatasetSpec and old_human is human and OldEmbedded is Embedded
    assert visorlib.train.DataError is importlib.import_module("visorlib.data.conversations").DataError
