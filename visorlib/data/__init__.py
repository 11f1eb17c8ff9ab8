"""What training and evaluation both read: conversation rows, collate, ``DataError``, dataset specs.

This package sits below :mod:`visorlib.train` and :mod:`visorlib.eval` (and :mod:`visorlib.analysis`),
so each of them imports it and none imports another for these pieces:

* :mod:`~visorlib.data.specs` — :class:`DatasetSpec`, the record that names a dataset;
* :mod:`~visorlib.data.conversations` — LLaVA-style rows, :class:`ConversationDataset`,
  :func:`collate`, the step-keyed batch plan and :class:`DataError`;
* :mod:`~visorlib.data.runlock` — the lock that keeps two runs out of one output folder.

The names below load on first use (PEP 562): the conversations module imports torch and PIL.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "DATASET_FORMATS": "specs", "DatasetSpec": "specs",
    "BatchPlan": "conversations", "ConversationDataset": "conversations", "DataError": "conversations",
    "collate": "conversations", "read_rows": "conversations",
    "RunDirError": "runlock", "RunLock": "runlock",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
