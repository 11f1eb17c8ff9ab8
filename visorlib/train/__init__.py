"""Training: recipes, data, the (FSDP2) trainer, router pseudo-labels, the synthetic task."""

from .data import BatchPlan, ConversationDataset, DataError, collate
from .recipe import Recipe, load_recipe
from .router import log_configurations, select_labels, train_router
from .runlock import RunDirError, RunLock
from .synth import make_synthetic_dataset
from .trainer import Trainer, configuration_for_step

__all__ = [
    "BatchPlan",
    "ConversationDataset",
    "DataError",
    "Recipe",
    "RunDirError",
    "RunLock",
    "Trainer",
    "collate",
    "configuration_for_step",
    "load_recipe",
    "log_configurations",
    "make_synthetic_dataset",
    "select_labels",
    "train_router",
]
