"""Potentials: the target an SMC run aims at, as per-step weights (DESIGN.md §3).

Each step commits tokens ``x_s`` at positions ``C`` drawn from a proposal ``q``. A potential
defines the per-token unnormalized target ``log pi(v) = exponent * log p_theta(v) + offset(v)``
and optionally a twist ``log gamma_t(x_t)``. The sampler's incremental log-weight is

    log G = sum_{i in C} [log pi(x_s^i) - log q(x_s^i)] + log gamma_s(x_s) - log gamma_t(x_t)

- ``None`` (no potential): ``pi = p_theta``; with the base proposal every weight is 1 (plain
  sampling; best-of-N ranks the particles afterwards with ``SMCOutput.best(score)``).
- ``SelfReward(beta)`` (SR-SMC): ``exponent = 1 + beta``; with the base proposal
  ``log G = beta * sum log p_theta(committed tokens)``, the paper's self-reward (``beta = 1``).
  The enumerable target is ``p0^(1 + beta)``. The answer is the highest-weight particle.
- ``RewardTilt(reward, alpha, schedule)``: target ``p0(x) exp(r(x) / alpha)``. Twist
  ``log gamma_t = lambda_t * r_hat(x_t) / alpha`` with ``lambda`` going from 0 to 1
  (``"constant"`` = 1, ``"linear"`` = progress, or a callable of progress in [0, 1]);
  ``r_hat(x_t) = alpha * log mean_m exp(r(x0^m) / alpha)``, ``x0^m ~ p_theta(x0 | x_t)``
  (``num_samples = M``) or ``r(argmax)`` (``num_samples = 0``, greedy). At the end ``x`` is clean
  and ``log gamma_0 = r(x) / alpha`` exactly. The initial twist enters ``log w`` and ``log Ẑ``.
- ``ProductTarget(weight=w, second_denoiser, second_cond)``: target ``p1^w p2^(1-w)`` with
  ``p1`` the sampler's denoiser under the sampler's ``cond`` and ``p2`` the second denoiser
  (default: the same one) under ``second_cond`` (default ``None``: unconditional — CFG with
  ``w > 1``). It proposes from the per-position normalized mixture, so ``log G`` is the log of
  that mixture's normalizer at each committed position. Support: both ``p1`` and ``p2`` > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .diffusion import inverse_cdf
from .models.base import Denoiser
from .rewards.base import Reward, check_reward_output
from .sampling.checks import check_count, check_denoiser_output, check_finite
from .sampling.context import StepContext, output_log_probs
from .smc import log_mean_exp

__all__ = ["Potential", "ProductTarget", "RewardTilt", "SelfReward", "get_twist_schedule"]


class Potential:
    """Base class: the plain target ``p_theta`` with no twist (also what ``potential=None`` means).

    A potential declares what the sampler must do for it (class attributes):

    - ``exponent``: the power of ``p_theta`` in the per-token target;
    - ``has_offset``: ``offset`` returns a tensor (else it is not called);
    - ``needs_log_probs``: ``twist`` / ``offset`` read the normalized log-probs of every
      position (else the sampler may normalize only the rows it draws from);
    - ``proposes``: the default proposal is the normalized per-token target;
    - ``extra_nfe``: network evaluations per particle per step beyond the denoiser's.

    A subclass that overrides ``offset`` or ``twist`` without declaring these flags gets
    ``has_offset`` / ``needs_log_probs`` set to ``True`` (always exact, maybe slower).
    ``bind(denoiser)`` is called once by the sampler; ``networks()`` lists the extra denoisers
    the potential calls (their per-row state follows the particles, see ``SMCSampler``)."""

    exponent: float = 1.0
    extra_nfe: int = 0
    proposes: bool = False
    has_offset: bool = False
    needs_log_probs: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overrides = {name for name in ("offset", "twist") if name in cls.__dict__}
        if "offset" in overrides and "has_offset" not in cls.__dict__:
            cls.has_offset = True
        if overrides and "needs_log_probs" not in cls.__dict__:
            cls.needs_log_probs = True

    def bind(self, denoiser: Denoiser) -> None:
        """Called once by the sampler with its denoiser (nothing to do here)."""

    def networks(self) -> tuple[Any, ...]:
        """Denoisers this potential calls besides the sampler's (none here)."""
        return ()

    def offset(self, ctx: StepContext) -> Tensor | None:
        """Additive per-token log-target term ``[R, L, V]`` beyond ``exponent * log p_theta``."""
        return None

    def twist(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor | None:
        """``log gamma_t(x_t)`` per row ``[R]``; ``None`` when the potential has no twist."""
        return None

    def final_twist(self, x0: Tensor) -> Tensor | None:
        """``log gamma_0(x0)`` for complete sequences ``[R]``."""
        return None


class SelfReward(Potential):
    """SR-SMC: weight each step by ``beta`` times the log-confidence of the tokens it commits."""

    needs_log_probs = False

    def __init__(self, beta: float = 1.0):
        beta = check_finite(beta, "beta", "SelfReward", minimum=0)
        self.beta = beta
        self.exponent = 1.0 + beta


def get_twist_schedule(schedule: str | Callable[[float], float]) -> Callable[[float], float]:
    """``lambda(progress)``: ``"constant"`` (1), ``"linear"`` (progress) or a callable."""
    if callable(schedule):
        return schedule
    if schedule == "constant":
        return lambda progress: 1.0
    if schedule == "linear":
        return lambda progress: progress
    raise ValueError(
        f"schedule={schedule!r} is not a twist schedule; use 'constant', 'linear' or a callable"
    )


class RewardTilt(Potential):
    """Reward-tilted target ``p0(x) exp(r(x) / alpha)`` with a tempered twist ``lambda_t``."""

    needs_log_probs = True  # the twist samples x0 from the normalized log-probs

    def __init__(
        self,
        reward: Reward,
        alpha: float = 0.1,
        schedule: str | Callable[[float], float] = "linear",
        num_samples: int = 1,
    ):
        hint = " (the tilt is exp(r / alpha))"
        check_finite(alpha, "alpha", "RewardTilt", positive=True, hint=hint)
        if not math.isfinite(1.0 / float(alpha)):
            raise ValueError(f"RewardTilt alpha={alpha!r} is so small that 1 / alpha overflows")
        num_samples = check_count(num_samples, "num_samples (0 = greedy x0)", 0, "RewardTilt")
        self.reward = reward
        self.alpha = float(alpha)
        self.schedule = get_twist_schedule(schedule)
        self.num_samples = num_samples

    def score(self, x0: Tensor) -> Tensor:
        return check_reward_output(self.reward, self.reward(x0), x0.shape[0])

    def twist(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor:
        lam = check_finite(
            self.schedule(ctx.progress), f"schedule({ctx.progress:.4g})", "RewardTilt"
        )
        if lam == 0.0:
            return torch.zeros(ctx.x_t.shape[0], dtype=torch.float64, device=ctx.x_t.device)
        return lam * self._r_hat(ctx, base_log_probs) / self.alpha

    def _r_hat(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor:
        masked = ctx.masked()
        M = max(self.num_samples, 1)
        if self.num_samples == 0:
            x0 = torch.where(masked, base_log_probs.argmax(-1), ctx.x_t).unsqueeze(1)
        else:
            x0 = ctx.x_t.unsqueeze(1).repeat(1, M, 1)  # [R, M, L]
            where = masked.unsqueeze(1).expand_as(x0)
            lp = base_log_probs.unsqueeze(1).expand(-1, M, -1, -1)[where]
            x0[where] = inverse_cdf(lp.exp_(), ctx.rand_at(where))  # (lp is a copy)
        r = self.score(x0.reshape(-1, x0.shape[-1])).reshape(-1, M)
        return self.alpha * log_mean_exp(r / self.alpha, dim=-1)

    def final_twist(self, x0: Tensor) -> Tensor:
        return self.score(x0) / self.alpha


class ProductTarget(Potential):
    """``p1^w p2^(1-w)``: product of experts / classifier-free guidance (``w > 1``)."""

    proposes = True
    has_offset = True
    needs_log_probs = True

    def __init__(
        self, weight: float, second_denoiser: Denoiser | None = None, second_cond: Any = None
    ):
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"ProductTarget weight must be a finite number > 0, got {weight}")
        self.exponent = float(weight)
        self.second_denoiser = second_denoiser
        self.second_cond = second_cond
        self.extra_nfe = 1

    def bind(self, denoiser: Denoiser) -> None:
        if self.second_denoiser is None:
            self.second_denoiser = denoiser
        if self.second_denoiser.vocab_size != denoiser.vocab_size:
            raise ValueError(
                f"ProductTarget: second_denoiser.vocab_size={self.second_denoiser.vocab_size} "
                f"differs from the sampler's denoiser ({denoiser.vocab_size})"
            )

    def networks(self) -> tuple[Any, ...]:
        return () if self.second_denoiser is None else (self.second_denoiser,)

    def offset(self, ctx: StepContext) -> Tensor:
        logits = self.second_denoiser(ctx.x_t, ctx.t, ctx.expand(self.second_cond))
        if ctx.plan.step == 0:  # once per run, as for the sampler's denoiser
            check_denoiser_output(self.second_denoiser, logits, ctx.x_t)
        lp2 = output_log_probs(self.second_denoiser, logits)
        # Outside the common support the target is 0: never let (1 - w) * (-inf) become +inf.
        return torch.where(torch.isfinite(lp2), (1.0 - self.exponent) * lp2, -torch.inf)
