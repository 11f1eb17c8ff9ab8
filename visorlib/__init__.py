"""visorlib: VISOR (Vision On Request) vision-language models in pure PyTorch.

Quick start::

    import visorlib
    visorlib.list_models()
    model = visorlib.build("llava-ov-0.5b", pretrained=True)
    processor = visorlib.processor_for(model)
"""

from .config import ConfigError, ModelConfig
from .hub import CheckpointError
from .models import InputError
from .zoo import build, from_pretrained, get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "ModelConfig",
    "build",
    "from_pretrained",
    "get_config",
    "list_models",
]
