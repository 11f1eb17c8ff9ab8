"""The FLOP oracle of the FLOPs tests: torch's own ``FlopCounterMode``, made version-proof.

``FlopCounterMode`` counts attention only through formulas registered for the fused SDPA kernels
it knows. Which kernel a CPU ``scaled_dot_product_attention`` dispatches to changes between
releases: torch 2.14.1 sends it to ``_scaled_dot_product_flash_attention_for_cpu``, which has no
formula there, so the counter saw **zero** attention FLOPs and every analytic-vs-counter check
failed by up to 70 %. Forcing SDPA's math backend inside the counter turns attention into the
plain ``QK^T`` and ``AV`` matmuls that every torch counts with its generic matmul rule, so the
oracle stays independent of visorlib's own formulas and equally strict on every supported torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """Count the FLOPs of everything run inside (no autograd), attention included."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        yield counter
