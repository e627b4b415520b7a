"""Noise schedules ``alpha(t)``: the probability that a token is still clean at time ``t``.

Convention (DESIGN.md §3): ``t ∈ [0, 1]``, ``t = 1`` fully masked, ``alpha`` decreasing with
``alpha(0) = 1``. A reverse step ``t -> s < t`` unmasks a masked token with probability
``(alpha(s) - alpha(t)) / (1 - alpha(t))`` (``Schedule.unmask_probability``).

- ``LinearSchedule``:    ``alpha(t) = 1 - t``
- ``CosineSchedule``:    ``alpha(t) = cos(pi t / 2)`` (MDLM's cosine noise)
- ``MaskGITCosineSchedule``: ``alpha(t) = 1 - sin(pi t / 2)``: the masked share ``sin(pi t / 2)``
  is MaskGIT's / Meissonic's ``cos(pi r / 2)`` at progress ``r = 1 - t`` (few tokens early, many
  late); training masks ``cos(pi u / 2)`` of a grid with ``u ~ U(0, 1)``, the same law
- ``LogLinearSchedule``: MDLM's log-linear noise ``sigma(t) = -log(1 - (1 - eps) t)``, so
  ``alpha(t) = exp(-sigma(t)) = 1 - (1 - eps) t`` (``alpha(1) = eps``, which keeps the ELBO
  weight ``-alpha'(t) / (1 - alpha(t)) = 1 / t`` finite near 1; the sampler starts fully masked).

``get_schedule(name)`` returns one by name (``"linear"``, ``"cosine"``, ``"maskgit_cosine"``,
``"loglinear"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CosineSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "MaskGITCosineSchedule",
    "Schedule",
    "get_schedule",
]


class Schedule:
    """Base class: subclasses define ``alpha(t)``; everything else derives from it."""

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise ``-log alpha(t)`` (MDLM's time conditioning)."""
        return -torch.log(self.alpha(t).clamp_min(1e-12))

    def unmask_probability(self, t: Tensor, s: Tensor) -> Tensor:
        """Probability that a token masked at ``t`` is clean at ``s < t``."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        return ((a_s - a_t) / (1.0 - a_t).clamp_min(1e-12)).clamp(0.0, 1.0)

    def loss_weight(self, t: Tensor) -> Tensor:
        """ELBO weight ``-alpha'(t) / (1 - alpha(t))`` by autograd (overridden where closed-form)."""
        t = t.detach().requires_grad_(True)
        with torch.enable_grad():
            a = self.alpha(t)
            (da,) = torch.autograd.grad(a.sum(), t)
        return (-da / (1.0 - a).clamp_min(1e-12)).detach()


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)


@dataclass(frozen=True)
class MaskGITCosineSchedule(Schedule):
    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - torch.sin(0.5 * math.pi * t)


@dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    eps: float = 1e-3

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1.0 - self.eps) * t)

    def loss_weight(self, t: Tensor) -> Tensor:
        return (1.0 - self.eps) / ((1.0 - self.eps) * t).clamp_min(1e-12)


SCHEDULES = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "maskgit_cosine": MaskGITCosineSchedule,
    "loglinear": LogLinearSchedule,
}


def get_schedule(name: str | Schedule) -> Schedule:
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not known; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()
