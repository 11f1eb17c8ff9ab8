"""Training: recipes, data, the (FSDP2) trainer, router pseudo-labels, the synthetic task.

The names below load on first use (PEP 562): the trainer imports ``torch.distributed`` (about 2 s
on a loaded 2-core machine), which ``visorlib --help`` and the ``data`` commands never need.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    # the data pieces live below train/ and eval/ (visorlib.data); still reachable from here
    "BatchPlan": ".data.conversations",
    "ConversationDataset": ".data.conversations",
    "DataError": ".data.conversations",
    "collate": ".data.conversations",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "log_configurations": "router",
    "select_labels": "router",
    "train_router": "router",
    "RunDirError": ".data.runlock",
    "RunLock": ".data.runlock",
    "make_synthetic_dataset": "synth",
    "Trainer": "trainer",
    "configuration_for_step": "trainer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
