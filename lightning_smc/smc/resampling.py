"""Resampling schemes: which particles survive a resample.

Every scheme has one signature::

    ancestors = scheme(log_weights, num_samples, generator)

``log_weights`` is ``[..., N]`` (any leading batch dimensions, unnormalized is fine);
``ancestors`` is a LongTensor ``[..., num_samples]`` of indices in ``[0, N)`` such that
``E[#{j : A_j = i}] = num_samples * W_i`` (unbiased). Schemes (Douc & Cappé 2005):

- ``multinomial``: ``A_j = F^{-1}(U_j)``, ``U_j`` iid uniform.
- ``stratified``:  ``U_j = (j + V_j) / M``, one uniform per stratum.
- ``systematic``:  ``U_j = (j + V) / M``, a single uniform shared by all strata.
- ``residual``:    ``floor(M W_i)`` deterministic copies, the rest multinomial on the residuals.

``F^{-1}`` is the inverse CDF done with ``cumsum`` + ``searchsorted`` in float64. Uniforms are
scaled by the CDF's last entry, so CDFs that sum to slightly less than one (float32 weights)
are handled, and the result is clamped to the last particle with positive weight, so a
zero-weight particle is never drawn.

``get_resampling(name)`` looks a scheme up by name; ``RESAMPLING_SCHEMES`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["RESAMPLING_SCHEMES", "ResamplingScheme", "get_resampling", "register_resampling"]

ResamplingScheme = Callable[[Tensor, int, "torch.Generator | None"], Tensor]
RESAMPLING_SCHEMES: dict[str, ResamplingScheme] = {}


def register_resampling(name: str) -> Callable[[ResamplingScheme], ResamplingScheme]:
    """Decorator registering a scheme under ``name``."""

    def wrap(fn: ResamplingScheme) -> ResamplingScheme:
        RESAMPLING_SCHEMES[name] = fn
        return fn

    return wrap


def get_resampling(name: str | ResamplingScheme) -> ResamplingScheme:
    """The scheme called ``name`` (a callable is returned as is)."""
    if callable(name):
        return name
    if name not in RESAMPLING_SCHEMES:
        valid = ", ".join(sorted(RESAMPLING_SCHEMES))
        raise ValueError(f"resampling={name!r} is not a known scheme; choose one of: {valid}")
    return RESAMPLING_SCHEMES[name]


def _weights(log_w: Tensor) -> Tensor:
    W = torch.softmax(log_w.to(torch.float64), dim=-1)
    if not torch.isfinite(W).all():
        raise ValueError("log_weights must contain at least one finite entry per row and no NaN")
    return W


def _uniforms(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
    return u.to(like.device)


def _inverse_cdf(W: Tensor, u: Tensor) -> Tensor:
    """Indices ``i`` with ``cdf[i-1] <= u * cdf[-1] < cdf[i]``; ``u`` in ``[0, 1)``, shape ``[..., M]``."""
    cdf = torch.cumsum(W, dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1:]).contiguous(), right=True)
    N = W.shape[-1]
    positions = torch.arange(N, device=W.device).expand_as(W)
    last_positive = torch.where(W > 0, positions, 0).amax(dim=-1, keepdim=True)
    return torch.minimum(idx, last_positive)


@register_resampling("multinomial")
def multinomial(
    log_w: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    W = _weights(log_w)
    return _inverse_cdf(W, _uniforms((*W.shape[:-1], num_samples), generator, W))


@register_resampling("stratified")
def stratified(log_w: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    W = _weights(log_w)
    j = torch.arange(num_samples, device=W.device, dtype=torch.float64)
    u = (j + _uniforms((*W.shape[:-1], num_samples), generator, W)) / num_samples
    return _inverse_cdf(W, u)


@register_resampling("systematic")
def systematic(log_w: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    W = _weights(log_w)
    j = torch.arange(num_samples, device=W.device, dtype=torch.float64)
    u = (j + _uniforms((*W.shape[:-1], 1), generator, W)) / num_samples
    return _inverse_cdf(W, u)


@register_resampling("residual")
def residual(log_w: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    W = _weights(log_w)
    scaled = num_samples * W
    copies = torch.floor(scaled)
    n_det = copies.sum(-1, keepdim=True).long()  # deterministic draws per row
    # Slot j < n_det takes the particle whose cumulative copy count first exceeds j.
    j = torch.arange(num_samples, device=W.device)
    det = torch.searchsorted(
        torch.cumsum(copies, -1).long(), j.expand(*W.shape[:-1], -1).contiguous(), right=True
    )
    # The remaining slots are multinomial draws on the residual weights.
    rest = (scaled - copies).clamp_min(0.0)
    has_rest = rest.sum(-1, keepdim=True) > 0
    rest = torch.where(has_rest, rest, W)  # rows with no residual mass draw nothing from it
    extra = _inverse_cdf(rest, _uniforms((*W.shape[:-1], num_samples), generator, W))
    shifted = torch.gather(extra, -1, (j - n_det).clamp_min(0))
    return torch.where(j < n_det, det.clamp_max(W.shape[-1] - 1), shifted)
