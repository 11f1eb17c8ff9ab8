"""Moved: :mod:`visorlib.data.runlock` holds this code now (train and eval both read it).

``from visorlib.train.runlock import X`` still works until visorlib 0.3, with a DeprecationWarning
naming the new path.
"""

from __future__ import annotations

from ..lazy import moved_module

__getattr__ = moved_module(__name__, "visorlib.data.runlock", "0.3")
