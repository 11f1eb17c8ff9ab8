"""Test-wide settings: never touch the network; Hub lookups use the local cache only."""

import os

# Set before huggingface_hub is imported anywhere, since it reads the variable at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
