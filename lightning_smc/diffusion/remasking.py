"""Remasking kernels (ReMDM, Wang et al. 2025): clean tokens may turn back into masks.

A reverse step ``t -> s`` of ReMDM with remasking probability ``sigma_t`` acts per position:

- a clean token of ``x_t`` is re-masked with probability ``sigma_t`` and kept otherwise;
- a masked token is unmasked with probability ``(alpha_s - (1 - sigma_t) alpha_t) / (1 -
  alpha_t)`` (a token drawn from the proposal) and stays masked otherwise,

with ``sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t)`` so that these are
probabilities; ``sigma = 0`` is MDLM's ancestral step. Two schedules of ``sigma_t``:

- ``max_cap``: ``sigma_t = min(eta, sigma_max)``;
- ``rescale``: ``sigma_t = eta * sigma_max``.

The last step of a block (``s = 0``) has ``sigma_max = 0``: everything left is unmasked and
nothing is re-masked, so the result is clean. Only generated positions (not the prompt) inside
the current block are re-masked. Position events are value-independent (uniforms only), so the
base kernel and every proposal share them and they cancel in ``log p - log q``;
``transition_log_prob`` gives the full probability of a transition (every event counted), used
by the enumeration tests and by anyone who needs the kernel's density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .schedules import Schedule, get_schedule
from .unmasking import UNMASKING_POLICIES, Ancestral, StepPlan, UnmaskingPolicy

__all__ = ["ReMDM", "transition_log_prob"]


@dataclass
class ReMDM(UnmaskingPolicy):
    """ReMDM remasking with ``alpha(t)`` from ``schedule`` (see the module docstring)."""

    schedule: Schedule | str = "linear"
    eta: float = 0.02
    mode: Literal["max_cap", "rescale"] = "max_cap"
    remasks = True

    def __post_init__(self) -> None:
        self.schedule = get_schedule(self.schedule)
        number = isinstance(self.eta, int | float) and not isinstance(self.eta, bool)
        if not (number and math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"ReMDM eta must be a finite number >= 0, got {self.eta!r}")
        if self.mode not in ("max_cap", "rescale"):
            raise ValueError(f"ReMDM mode={self.mode!r} is not known; use 'max_cap' or 'rescale'")
        if self.mode == "rescale" and self.eta > 1:
            raise ValueError(f"ReMDM mode='rescale' needs eta in [0, 1], got {self.eta}")

    def event_probabilities(self, plan: StepPlan) -> tuple[float, float]:
        """``(p_unmask, sigma)`` of step ``plan``: unmask a masked token; re-mask a clean one."""
        t = torch.tensor(plan.t, dtype=torch.float64)
        s = torch.tensor(plan.s, dtype=torch.float64)
        a_t, a_s = float(self.schedule.alpha(t)), float(self.schedule.alpha(s))
        if plan.closes_block:
            return 1.0, 0.0
        sigma_max = 1.0 if a_t <= 0 else min(1.0, (1.0 - a_s) / a_t)
        sigma = min(self.eta, sigma_max) if self.mode == "max_cap" else self.eta * sigma_max
        p_unmask = (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t) if a_t < 1 else 1.0
        return min(max(p_unmask, 0.0), 1.0), sigma

    def select(self, masked, plan, u=None, confidence=None):
        p_unmask, _ = self.event_probabilities(plan)
        return masked.clone() if p_unmask >= 1.0 else masked & (u < p_unmask)

    def remask(self, clean: Tensor, masked: Tensor, plan: StepPlan, u: Tensor) -> Tensor:
        _, sigma = self.event_probabilities(plan)
        return clean & (u < sigma)


UNMASKING_POLICIES["remdm"] = ReMDM


def transition_log_prob(
    policy: Ancestral | ReMDM,
    plan: StepPlan,
    x_t: Tensor,
    x_s: Tensor,
    log_q: Tensor,
    mask_id: int,
    generated: Tensor | None = None,
) -> Tensor:
    """``log K(x_s | x_t)`` per row ``[R]`` of a value-independent kernel: every event counted
    (unmask to a token with ``log_q [R, L, V]``, stay masked, re-mask, keep). Positions outside
    the step's block and prompt positions must not change. ``-inf`` for impossible moves."""
    if isinstance(policy, ReMDM):
        p_unmask, sigma = policy.event_probabilities(plan)
    elif isinstance(policy, Ancestral):
        t = torch.tensor(plan.t, dtype=torch.float64)
        s = torch.tensor(plan.s, dtype=torch.float64)
        p_unmask = 1.0 if plan.closes_block else float(policy.schedule.unmask_probability(t, s))
        sigma = 0.0
    else:
        raise TypeError(
            f"transition_log_prob needs Ancestral or ReMDM, got {type(policy).__name__}"
        )
    in_block = torch.zeros_like(x_t, dtype=torch.bool)
    in_block[:, plan.block_start : plan.block_end] = True
    movable = in_block if generated is None else in_block & generated
    was_masked, now_masked = x_t == mask_id, x_s == mask_id
    token_lp = log_q.gather(-1, x_s.clamp_max(log_q.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)

    def log(p: float) -> Tensor:
        return torch.tensor(math.log(p) if p > 0 else -math.inf, dtype=torch.float64)

    lp = torch.zeros_like(x_t, dtype=torch.float64)
    unmasked = movable & was_masked & ~now_masked
    lp = torch.where(unmasked, log(p_unmask) + token_lp.double(), lp)
    lp = torch.where(movable & was_masked & now_masked, log(1.0 - p_unmask), lp)
    lp = torch.where(movable & ~was_masked & now_masked, log(sigma), lp)
    kept = movable & ~was_masked & ~now_masked
    lp = torch.where(kept, torch.where(x_s == x_t, log(1.0 - sigma), log(0.0)), lp)
    frozen = ~movable & (x_s != x_t)
    lp = torch.where(frozen, log(0.0), lp)
    return lp.sum(-1)
