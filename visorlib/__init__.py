"""visorlib: VISOR (Vision On Request) vision-language models in pure PyTorch.

Quick start::

    import visorlib
    visorlib.list_models()
    model = visorlib.build("llava-ov-0.5b", pretrained=True)
    processor = visorlib.processor_for(model)
"""

from . import compat
from .config import ConfigError, ModelConfig
from .flops import flops
from .hub import CheckpointError
from .models import InputError
from .models.llava_onevision import LlavaOnevisionProcessor
from .models.qwen2_vl import Qwen2VLProcessor
from .zoo import build, from_pretrained, get_config, list_models, processor_for, visorize

__version__ = "0.1.0"

compat.install()  # old module paths (visorlib.blocks, visorlib.backbones, ...) keep importing

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "LlavaOnevisionProcessor",
    "ModelConfig",
    "Qwen2VLProcessor",
    "build",
    "flops",
    "from_pretrained",
    "get_config",
    "list_models",
    "processor_for",
    "visorize",
]
