"""The configuration router (paper §4.3).

A routing token is appended after each question. At the layer just before the first SA candidate
that can be skipped, a small MLP reads the routing token's hidden state and scores every viable
configuration. With several questions in one sample the costliest prediction wins, so that no
question gets less visual processing than it asked for. The router is trained offline on
pseudo-labels (see the training guide); here it only predicts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..modules.layers import RMSNorm
from .plan import LayerPlan


class ConfigurationRouter(nn.Module):
    """``MLP(norm(h_routing_token)) -> logits over configurations``, plus the routing token's embedding.

    Args:
        dim: Decoder width.
        hidden: MLP hidden width.
        num_configurations: Number of viable configurations.
    """

    def __init__(self, dim: int, hidden: int, num_configurations: int):
        super().__init__()
        # The routing token has its own learned embedding instead of a vocabulary row, so adding a
        # router never resizes (or retrains) the language model's embedding table.
        self.token = nn.Parameter(torch.zeros(dim))
        self.norm = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_configurations))
        self._warned_untrained = False

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.token, std=std)
        self.norm.reset_parameters()
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def is_untrained(self) -> bool:
        """True while the router still holds its initial weights (it would route at random).

        Every initialisation visorlib performs (:meth:`reset_parameters`, ``init_weights``,
        ``visorize``) leaves both MLP biases exactly zero and the norm's scale exactly one, and
        any optimiser step moves them (the last bias's gradient is ``softmax - target``, never
        zero). Reading that state off the weights themselves works for every way a router can
        arrive (fresh build, trainer export, ``save_pretrained``, a DCP resume, a hand-made state
        dict) without a marker in the checkpoint that older files would lack.
        """
        tensors = (self.mlp[0].bias, self.mlp[2].bias, self.norm.weight)
        if any(t.is_meta for t in tensors):
            return False  # no values to judge (a meta-device build)
        return bool(self.mlp[0].bias.eq(0).all() & self.mlp[2].bias.eq(0).all() & self.norm.weight.eq(1).all())

    def warn_if_untrained(self, model: str = "the model") -> None:
        """Warn once per router when it is asked to route while still untrained.

        Silent while the router itself is being trained (training mode with gradients on), which
        is the one time an untrained router is expected to route.
        """
        if self._warned_untrained or (self.training and torch.is_grad_enabled()):
            return
        if self.is_untrained():
            self._warned_untrained = True
            warnings.warn(
                f"{model}: sa_layers='router' with a router that was never trained (its weights are still the "
                "initial ones), so its configuration choices are arbitrary; train it (the recipe's router "
                "stage) or load trained weights, or pass a fixed sa_layers",
                UserWarning,
                stacklevel=4,
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Configuration logits ``[N, C]`` for routing-token states ``hidden [N, D]``."""
        return self.mlp(self.norm(hidden))


def route_configs(
    plan: LayerPlan, logits: torch.Tensor, sample_of_token: torch.Tensor, batch_size: int
) -> list[list[int]]:
    """One configuration per sample: the costliest of its routing tokens' predictions.

    Args:
        plan: Supplies the configurations and their cost order.
        logits: ``[N, C]`` router scores, one row per routing token.
        sample_of_token: ``[N]`` sample index of each routing token.
        batch_size: Samples in the batch.

    Raises:
        ValueError: a sample has no routing token (the processor adds one after each question).
    """
    chosen: list[list[int] | None] = [None] * batch_size
    for sample, pick in zip(sample_of_token.tolist(), logits.argmax(-1).tolist(), strict=False):
        candidate = plan.configurations[pick]
        if chosen[sample] is None or plan.cost(candidate) > plan.cost(chosen[sample]):
            chosen[sample] = candidate
    missing = [i for i, c in enumerate(chosen) if c is None]
    if missing:
        raise ValueError(
            f"sa_layers='router' but samples {missing} contain no routing token "
            f"(id {plan.cfg.routing_token_id}); append it after each question"
        )
    return chosen  # type: ignore[return-value]

