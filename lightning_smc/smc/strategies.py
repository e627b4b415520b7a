"""Strategies that decide *when* to resample.

A strategy is called at the start of step ``k`` (``k >= 1``: never before the first step and
never after the last, whose weights are returned) with the current log-weights ``log_w``
``[..., N]`` and a ``StepInfo``; it returns a bool tensor ``[...]``: resample that row or not.
Rows decide independently, so a prompt's result does not depend on the rest of its batch.

- ``Always()``               resample at every step
- ``Never()``                importance sampling / best-of-N, no resampling
- ``EveryK(k)``              at steps ``k, 2k, ...``
- ``ESSBelow(fraction)``     when ``ESS < fraction * N`` (the adaptive default, fraction 0.5)
- ``AtBlockBoundaries(fraction=None)``  at the first step of each semi-autoregressive block,
  optionally only if ``ESS < fraction * N`` (SR-SMC's per-block rule)

``get_strategy(spec)`` builds one from a name (``"always"``, ``"never"``, ``"every:10"``,
``"ess:0.5"``, ``"block"``, ``"block:0.5"``) or returns a strategy object unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .weights import ess

__all__ = [
    "AtBlockBoundaries",
    "Always",
    "ESSBelow",
    "EveryK",
    "Never",
    "ResampleStrategy",
    "StepInfo",
    "get_strategy",
]


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler stands: ``step`` (0-based index of the step about to run),
    ``num_steps`` (total), ``block_start`` (True when ``step`` opens a new block)."""

    step: int
    num_steps: int
    block_start: bool = False


class ResampleStrategy(Protocol):
    def __call__(self, log_w: Tensor, info: StepInfo) -> Tensor: ...


def _rows(log_w: Tensor, value: bool) -> Tensor:
    return torch.full(log_w.shape[:-1], value, dtype=torch.bool, device=log_w.device)


def _ess_below(log_w: Tensor, fraction: float) -> Tensor:
    return ess(log_w) < fraction * log_w.shape[-1]


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ess_threshold must be in (0, 1], got {fraction}")


@dataclass(frozen=True)
class Always:
    def __call__(self, log_w: Tensor, info: StepInfo) -> Tensor:
        return _rows(log_w, True)


@dataclass(frozen=True)
class Never:
    def __call__(self, log_w: Tensor, info: StepInfo) -> Tensor:
        return _rows(log_w, False)


@dataclass(frozen=True)
class EveryK:
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"resample every k steps needs k >= 1, got {self.k}")

    def __call__(self, log_w: Tensor, info: StepInfo) -> Tensor:
        return _rows(log_w, info.step % self.k == 0)


@dataclass(frozen=True)
class ESSBelow:
    fraction: float = 0.5

    def __post_init__(self) -> None:
        _check_fraction(self.fraction)

    def __call__(self, log_w: Tensor, info: StepInfo) -> Tensor:
        return _ess_below(log_w, self.fraction)


@dataclass(frozen=True)
class AtBlockBoundaries:
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None:
            _check_fraction(self.fraction)

    def __call__(self, log_w: Tensor, info: StepInfo) -> Tensor:
        if not info.block_start:
            return _rows(log_w, False)
        return _rows(log_w, True) if self.fraction is None else _ess_below(log_w, self.fraction)


_NAMES = "'always', 'never', 'every:K', 'ess:FRACTION', 'block' or 'block:FRACTION'"


def get_strategy(spec: str | ResampleStrategy) -> ResampleStrategy:
    """A strategy from its name, e.g. ``"ess:0.5"``, ``"every:10"``, ``"block"``."""
    if not isinstance(spec, str):
        return spec
    name, _, arg = spec.partition(":")
    try:
        if name == "always" and not arg:
            return Always()
        if name == "never" and not arg:
            return Never()
        if name == "every":
            return EveryK(int(arg))
        if name == "ess":
            return ESSBelow(float(arg) if arg else 0.5)
        if name == "block":
            return AtBlockBoundaries(float(arg) if arg else None)
    except ValueError as err:
        raise ValueError(f"resample_when={spec!r}: {err}") from err
    raise ValueError(f"resample_when={spec!r} is not a known strategy; use {_NAMES}")
