"""Log-space weight helpers.

Notation (DESIGN.md §3): ``log_w`` are unnormalized log-weights with the particle axis last,
shape ``[..., N]``, float64 by convention. ``W`` are the normalized weights
``W_i = exp(log_w_i) / sum_j exp(log_w_j)``.

- ``normalize(log_w)``     -> ``log W`` (``logsumexp`` over the particle axis is 0)
- ``log_mean_exp(log_w)``  -> ``log (1/N) sum_i exp(log_w_i)``: the factor a resample adds to ``log Ẑ``
- ``ess(log_w)``           -> ``1 / sum_i W_i^2`` in ``[1, N]``

Example::

    >>> log_w = torch.tensor([0.0, 0.0, -float("inf")], dtype=torch.float64)
    >>> ess(log_w)
    tensor(2., dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ess", "log_mean_exp", "normalize"]


def normalize(log_w: Tensor, dim: int = -1) -> Tensor:
    """Normalized log-weights: ``log_w - logsumexp(log_w)`` along ``dim``."""
    return log_w - torch.logsumexp(log_w, dim=dim, keepdim=True)


def log_mean_exp(log_w: Tensor, dim: int = -1) -> Tensor:
    """``log (1/N) sum exp(log_w)`` along ``dim`` (numerically stable)."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def ess(log_w: Tensor, dim: int = -1) -> Tensor:
    """Effective sample size ``1 / sum W_i^2`` of the weights along ``dim``."""
    log_W = normalize(log_w, dim)
    return torch.exp(-torch.logsumexp(2.0 * log_W, dim=dim))
