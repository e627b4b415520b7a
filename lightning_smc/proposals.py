"""Proposals ``q(x_s | x_t)``: the per-token distributions the sampler draws committed tokens from.

A proposal is called as ``proposal(ctx, base_log_probs) -> log_q [R, L, V]`` (normalized
log-probabilities, mask token at ``-inf``) and returns its *own* log-probabilities, so the
sampler can weight by ``log pi_step(x_s | x_t) - log q(x_s | x_t)`` exactly (DESIGN.md §3).
``extra_nfe`` counts the additional network calls it makes per step; ``correct`` says whether
the sampler applies the ``log p - log q`` correction; the sampler calls ``bind(potential,
denoiser)`` once when it is built (a no-op on the base class ``Proposal``).

- no proposal (``None``): the base kernel ``p_theta``; the potential may supply a default
  (``ProductTarget`` proposes from its normalized geometric mixture).
- ``DenoiserProposal(q_denoiser)``: any second denoiser, e.g. the base model with a LoRA
  adapter (SMCamot). ``correct=False`` reproduces the ICLR 2026 reference code, which weights
  particles by the twist alone and drops ``log p - log q``; the resulting target is then *not*
  ``p0 exp(r / alpha)`` unless ``q = p``. Use it only to compare with that code.
- ``GradientProposal(reward, alpha, schedule, tau, scale)``: SMCgrad (Propgrad with one
  particle), the first-order locally optimal proposal of ICLR 2026 (arXiv 2505.22524). At the
  masked positions of ``x_t``

      log q(v | x_t) = log_softmax(log p_theta(v | x_t) + scale * lambda_s / alpha * g[v])

  where ``g = d r(s) / d s`` is the reward gradient at a soft one-hot ``s [R, L, V]``: at masked
  positions a Gumbel-softmax relaxation of ``x0 ~ p_theta(x0 | x_t)``,
  ``softmax((log p_theta + G) / tau)``, at clean positions the hard one-hot of ``x_t``. Clean
  positions keep the base log-probabilities and the mask token gets no mass. ``lambda_s`` is
  the twist schedule at the progress of the *next* state ``x_s`` (``(step + 1) / num_steps``):
  the locally optimal proposal is ``p_theta(x_s | x_t) gamma_s(x_s)``, and ``gamma_s`` is the
  twist the potential applies to ``x_s``; at the last step ``lambda = 1`` as in the final
  reward. Any choice is exact since the sampler weights by ``log p - log q``; this one only
  makes the proposal closer to optimal. ``reward``, ``alpha`` and ``schedule`` default to the
  sampler's ``RewardTilt`` potential (read by ``bind``); the reward must be differentiable
  (``reward.differentiable = True``, accepting soft one-hot ``[R, L, V]`` float input with
  ``V`` the denoiser vocabulary including the mask id). The Gumbel noise comes from the
  per-prompt generators (``ctx.rand_at``), so results do not depend on batch composition.
  ``extra_nfe = 0``: no extra denoiser call, but one reward forward and backward per step (the
  denoiser is never differentiated; skipped when ``scale * lambda_s = 0`` or nothing is
  masked). ``correct=False`` drops ``log p - log q`` like ``DenoiserProposal``: inexact, the
  target is then no longer ``p0 exp(r / alpha)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .models.base import Denoiser
from .potentials import RewardTilt, get_twist_schedule
from .rewards.base import Reward, check_reward_output
from .sampling.checks import check_finite
from .sampling.context import StepContext, output_log_probs

__all__ = ["DenoiserProposal", "GradientProposal", "Proposal"]


class Proposal:
    """Base class of proposals: ``proposal(ctx, base_log_probs) -> log_q [R, L, V]``.

    ``extra_nfe``: network evaluations per particle per step it adds; ``correct``: whether the
    sampler applies ``log p - log q``; ``bind(potential, denoiser)`` is called once by the
    sampler (nothing to do here); ``networks()`` lists the denoisers it calls (their per-row
    state follows the particles)."""

    extra_nfe: int = 0
    correct: bool = True

    def bind(self, potential: Any, denoiser: Denoiser | None = None) -> Proposal:
        return self

    def networks(self) -> tuple[Any, ...]:
        return ()

    def __call__(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor:
        raise NotImplementedError


class DenoiserProposal(Proposal):
    """Propose from another denoiser ``q``: ``log q(x0_i | x_t)`` at every position."""

    extra_nfe = 1

    def __init__(self, denoiser: Denoiser, correct: bool = True):
        self.denoiser = denoiser
        self.correct = correct

    def networks(self) -> tuple[Any, ...]:
        return (self.denoiser,)

    @classmethod
    def from_adapter(cls, base: Any, adapter: str | Path, correct: bool = True) -> DenoiserProposal:
        """SMCamot: the LoRA adapter saved at ``adapter`` (peft format, written by
        ``AmortizedProposalModule``) on ``base``. peft adapts ``base`` in place, so pass a copy if
        the sampler also uses ``base`` as ``p_theta`` (or use ``proposal.denoiser.base_denoiser``,
        the same module with the adapter switched off). An adapter trained for another base
        model or vocabulary is refused."""
        from .models.lora import LoRADenoiser

        return cls(LoRADenoiser.from_adapter(base, adapter), correct=correct)

    def __call__(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor:
        logits = self.denoiser(ctx.x_t, ctx.t, ctx.cond)
        if logits.shape != base_log_probs.shape:
            raise ValueError(
                f"DenoiserProposal: the proposal denoiser returned logits {tuple(logits.shape)} but the base "
                f"model gives {tuple(base_log_probs.shape)}; both must share the vocabulary and mask_id"
            )
        return output_log_probs(self.denoiser, logits)


def _reward_name(reward: Any) -> str:
    return getattr(reward, "__name__", type(reward).__name__)


def _check_differentiable(reward: Any) -> None:
    if not getattr(reward, "differentiable", False):
        raise ValueError(
            f"GradientProposal: reward {_reward_name(reward)} is not differentiable; SMCgrad needs "
            "a differentiable reward (one with differentiable = True that also accepts soft "
            "one-hot input [B, L, V], e.g. the learned reward)"
        )


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not one."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _check_alpha(alpha: Any, source: str) -> float:
    value = _finite(alpha)
    if value is None or value <= 0:
        raise ValueError(
            f"GradientProposal: alpha must be a finite number > 0 (the tilt is exp(r / alpha)), "
            f"got {alpha!r} from {source}"
        )
    return value


def _reward_dtype(reward: Any) -> torch.dtype:
    """The floating dtype the reward computes in: ``reward.dtype``, else its first floating
    parameter's, else the default dtype (float32)."""
    dtype = getattr(reward, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    parameters = getattr(reward, "parameters", None)
    if callable(parameters):
        for p in parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.get_default_dtype()


class GradientProposal(Proposal):
    """SMCgrad: tilt the base kernel by the reward gradient at a Gumbel-softmax relaxation.

    Args:
        reward: a differentiable reward (default: the ``RewardTilt`` potential's).
        alpha: the tilt temperature of ``exp(r / alpha)`` (default: the ``RewardTilt``'s).
        schedule: the twist schedule ``lambda(progress)``, ``"constant"``, ``"linear"`` or a
            callable (default: the ``RewardTilt``'s; ``"linear"`` without one).
        tau: Gumbel-softmax temperature (> 0) of the relaxed ``x0 ~ p_theta(x0 | x_t)``.
        scale: a multiplier on the gradient tilt (1 = the first-order locally optimal
            proposal, 0 = the base kernel); the sampler's correction keeps any value exact.
        correct: apply the ``log p - log q`` correction (``False``: inexact, see the module
            docstring).

    See the module docstring for the proposal; the sampler calls ``bind(potential, denoiser)``.
    The reward is evaluated on all ``R`` rows at once and each row's score must depend on that
    row only (no batch statistics), so that the gradient of the summed score is per row.
    """

    extra_nfe = 0  # no denoiser call; one reward forward + backward per step

    def __init__(
        self,
        reward: Reward | None = None,
        alpha: float | None = None,
        schedule: str | Callable[[float], float] | None = None,
        tau: float = 1.0,
        scale: float = 1.0,
        correct: bool = True,
    ):
        tau_value = _finite(tau)
        if tau_value is None or tau_value <= 0:
            raise ValueError(
                f"GradientProposal: tau (the Gumbel-softmax temperature) must be a finite "
                f"number > 0, got {tau!r}"
            )
        if _finite(scale) is None or float(scale) < 0:
            raise ValueError(f"GradientProposal: scale must be a finite number >= 0, got {scale!r}")
        if reward is not None:
            _check_differentiable(reward)
        if alpha is not None:
            _check_alpha(alpha, "the alpha argument")
        if schedule is not None:
            get_twist_schedule(schedule)  # validates it
        self.tau, self.scale, self.correct = float(tau), float(scale), correct
        self._given = (reward, alpha, schedule)
        self.reward: Any = None
        self.alpha: float | None = None
        self.schedule: Callable[[float], float] | None = None
        self.vocab_size: int | None = None
        if reward is not None and alpha is not None:  # usable without a sampler
            self._resolve(reward, alpha, schedule if schedule is not None else "linear")

    def bind(self, potential: Any, denoiser: Denoiser | None = None) -> GradientProposal:
        """Fill ``reward``, ``alpha`` and ``schedule`` not given from a ``RewardTilt`` potential."""
        reward, alpha, schedule = self._given
        tilt = potential if isinstance(potential, RewardTilt) else None
        if tilt is None and (reward is None or alpha is None):
            missing = [n for n, v in (("reward", reward), ("alpha", alpha)) if v is None]
            raise ValueError(
                f"GradientProposal: no {' and no '.join(missing)} given and the potential is "
                f"{type(potential).__name__}, not a RewardTilt; pass reward= and alpha= or use "
                "potential=RewardTilt(reward, alpha=...)"
            )
        if tilt is not None:
            reward = tilt.reward if reward is None else reward
            alpha = tilt.alpha if alpha is None else alpha
            schedule = tilt.schedule if schedule is None else schedule
        source = "the alpha argument" if self._given[1] is not None else "the RewardTilt"
        self._resolve(reward, alpha, schedule if schedule is not None else "linear", source)
        self.vocab_size = getattr(denoiser, "vocab_size", None)
        return self

    def _resolve(self, reward, alpha, schedule, source: str = "the alpha argument") -> None:
        _check_differentiable(reward)
        self.reward = reward
        self.alpha = _check_alpha(alpha, source)
        self.schedule = get_twist_schedule(schedule)

    def __call__(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor:
        if self.reward is None:
            raise RuntimeError(
                "GradientProposal has no reward: pass reward= and alpha=, or give it to an "
                "SMCSampler with a RewardTilt potential (which calls bind)"
            )
        V = base_log_probs.shape[-1]
        if self.vocab_size is not None and self.vocab_size != V:
            raise ValueError(
                f"GradientProposal: base log-probs have {V} entries per position but the bound "
                f"denoiser's vocab_size is {self.vocab_size}"
            )
        plan = ctx.plan
        progress = min((plan.step + 1) / plan.num_steps, 1.0)  # at x_s
        lam = check_finite(self.schedule(progress), f"schedule({progress:.4g})", "GradientProposal")
        coefficient = self.scale * lam / self.alpha
        masked = ctx.masked()
        if coefficient == 0.0 or not bool(masked.any()):
            return base_log_probs
        base_masked = base_log_probs[masked]  # [#masked, V]
        grad = self._gradient(ctx, base_masked, masked)
        log_q = base_log_probs.clone()
        tilted = base_masked + coefficient * grad.to(base_log_probs.dtype)
        tilted[:, ctx.mask_id] = -torch.inf
        log_q[masked] = torch.log_softmax(tilted, dim=-1)
        return log_q

    def _gradient(self, ctx: StepContext, base_masked: Tensor, masked: Tensor) -> Tensor:
        """``d r(s) / d s`` at the masked positions, ``[#masked, V]`` in the reward's dtype;
        ``base_masked [#masked, V]``: the base log-probs there."""
        M, V = base_masked.shape
        R = masked.shape[0]
        u = None
        if ctx.scratch is not None:
            u = ctx.scratch.get("gradient_uniforms", (M, V), torch.float64, masked.device)
        u = ctx.rand_at(masked, (V,), out=u)  # per-prompt streams, float64
        # Gumbel-softmax of x0 ~ p_theta(x0 | x_t): softmax((log p + G) / tau), G = -log(-log u)
        noise = u.clamp_min_(torch.finfo(torch.float64).tiny).log_().neg_().log_().neg_()
        logits = noise.add_(base_masked.to(torch.float64)).div_(self.tau)
        logits[:, ctx.mask_id] = -torch.inf
        dtype = _reward_dtype(self.reward)
        relaxed = torch.softmax(logits, dim=-1).to(dtype)
        hard = ctx.x_t.clamp(0, V - 1)
        # inference_mode(False): a Lightning validation loop samples under inference mode
        with torch.inference_mode(False), torch.enable_grad():
            soft = torch.nn.functional.one_hot(hard, V).to(dtype)
            soft[masked] = relaxed
            soft = soft.detach().requires_grad_(True)
            score = check_reward_output(self.reward, self.reward(soft), R)
            if not score.requires_grad:
                raise ValueError(
                    f"GradientProposal: reward {_reward_name(self.reward)} returned a score that "
                    "does not depend on its soft one-hot input; a differentiable reward must be "
                    "differentiable with respect to it"
                )
            (grad,) = torch.autograd.grad(score.sum(), soft, allow_unused=True)
        if grad is None:
            raise ValueError(
                f"GradientProposal: reward {_reward_name(self.reward)} returned a score that does "
                "not depend on its soft one-hot input"
            )
        grad = grad.detach()[masked]
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(
                f"GradientProposal: the gradient of reward {_reward_name(self.reward)} with "
                "respect to its soft one-hot input is not finite (NaN or inf)"
            )
        return grad
