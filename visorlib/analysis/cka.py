"""How the visual tokens change inside the language model: pairwise linear CKA (paper §3, Fig. 3).

Centered Kernel Alignment (Cortes et al. 2012; Kornblith et al. 2019) compares two
representations of the same ``n`` tokens, ``X [n, d]`` and ``Y [n, d]``, through their Gram
matrices ``K = X X^T`` and ``L = Y Y^T``. It is 1 when one is a rotation and rescaling of the
other, and near 0 when they share no structure. Here ``X`` and ``Y`` are one sample's visual
tokens at two layer boundaries (``0`` = entering layer 0, ``i`` = leaving layer ``i - 1``); a
dataset's matrix is the mean of its samples' matrices.

Two estimators of HSIC (the numerator):

* ``"paper"`` (default) — the paper's appendix M, eq. (4): ``K~ = HKH`` with the centring matrix
  ``H = I - 11^T/n``, ``CKA = <K~, L~>_F / (|K~|_F |L~|_F)``. This is the *biased* HSIC
  estimator (note: the issue text calls appendix M's estimator unbiased; eq. 4 is the biased one).
* ``"unbiased"`` — Song et al. (2012)'s unbiased HSIC, as Kornblith et al. use for minibatches:
  Gram matrices of centred features with the diagonal zeroed and the correction terms. Prefer it
  when there are few tokens per sample relative to the width (the biased estimator is inflated
  then).

**Memory bound.** No ``n x n`` matrix is held per layer pair: the Gram rows are formed ``chunk``
at a time for all layers at once (``layers x chunk x n`` floats) and every needed inner product
(Frobenius products, row sums) is accumulated, so thousands of visual tokens fit.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("paper", "unbiased")


def cka_matrix(states: torch.Tensor, estimator: str = "paper", chunk: int = 256) -> torch.Tensor:
    """Pairwise linear CKA between the layers of one sample.

    Args:
        states: ``[layers, n, d]`` the same ``n`` tokens at each layer.
        estimator: ``"paper"`` (appendix M, eq. 4) or ``"unbiased"`` (see the module docstring).
        chunk: Gram rows per block (peak extra memory ``layers * chunk * n`` floats).

    Returns:
        ``[layers, layers]`` float64, symmetric, 1 on the diagonal (NaN where a layer's tokens are
        all equal: CKA is undefined for a constant representation).

    Raises:
        ValueError: An unknown estimator, or too few tokens (``n < 2``; ``n < 4`` unbiased).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"CKA estimator must be one of {ESTIMATORS}, got {estimator!r}")
    layers, n, _ = states.shape
    if n < (4 if estimator == "unbiased" else 2):
        raise ValueError(f"CKA needs at least {4 if estimator == 'unbiased' else 2} tokens, got {n}")
    x = states.double()
    x = x - x.mean(dim=1, keepdim=True)  # X H: centred features, so X X^T is already H K H
    inner = torch.zeros(layers, layers, dtype=torch.float64, device=x.device)
    sums = torch.zeros(layers, n, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        rows = x[:, start:start + chunk] @ x.transpose(1, 2)                # [layers, c, n] Gram rows
        if estimator == "unbiased":
            index = torch.arange(rows.shape[1], device=x.device)
            rows[:, index, index + start] = 0                                # K~: zero diagonal
            sums[:, start:start + chunk] = rows.sum(dim=2)
        flat = rows.reshape(layers, -1)
        inner += flat @ flat.T                                               # <K_i, K_j>_F, summed by rows
    if estimator == "unbiased":
        totals = sums.sum(dim=1)
        # Song et al. (2012), eq. 5: tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1.
        inner = inner + totals[:, None] * totals[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (sums @ sums.T)
        inner = inner / (n * (n - 3))
    scale = inner.diagonal().clamp_min(0).sqrt()
    out = inner / (scale[:, None] * scale[None, :])
    return out.cpu()


def linear_cka(x: torch.Tensor, y: torch.Tensor, estimator: str = "paper") -> float:
    """CKA between two representations ``[n, d1]`` and ``[n, d2]`` of the same tokens.

    Widths may differ (zero-padded to the wider one: padding adds nothing to a Gram matrix).
    """
    width = max(x.shape[1], y.shape[1])
    pad = [torch.nn.functional.pad(t.double(), (0, width - t.shape[1])) for t in (x, y)]
    return float(cka_matrix(torch.stack(pad), estimator)[0, 1])
