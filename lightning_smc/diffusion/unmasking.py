"""Unmasking policies: which masked positions a reverse step commits.

A sampler run is a ``StepPlan`` list (``plan_steps``): the generation region ``[start, L)``
(after a prompt prefix of length ``start``) is cut into semi-autoregressive blocks of
``block_length`` (one block when ``None``), and the ``num_steps`` steps are shared equally
among blocks. Step ``i`` of the ``S`` steps in a block runs from block-local time
``t = 1 - i/S`` to ``s = 1 - (i+1)/S``; the last step of a block reaches ``s = 0`` and commits
everything left in it.

Policies (rows are particle sequences ``[R, L]``; ``masked`` marks masked positions in the
current block; ``count`` = ``ceil(#masked / steps left)``, the even split LLaDA uses):

- ``ancestral``      each masked position independently with ``(alpha(s)-alpha(t))/(1-alpha(t))``
                     (MDLM; random count).
- ``random``         ``count`` positions uniformly at random (LLaDA "random").
- ``low_confidence`` the ``count`` positions whose sampled candidate is most probable
                     (LLaDA / MaskGIT).
- ``remdm``          ``ancestral`` with ReMDM remasking of clean tokens (``diffusion.remasking``).
- ``threshold``      every position whose candidate's probability is ``>= threshold``, at least
                     the most confident one (Fast-dLLM); a block may finish early.
- ``maskgit``        MaskGIT / Meissonic: the schedule's count (``n_block * (1 - alpha(s))``
                     positions stay masked after the step, at least one is committed), ranked by
                     ``log confidence + tau_k * Gumbel`` with ``tau_k`` annealed linearly from
                     ``noise`` to 0 over the block's steps (``MaskGIT``).

``ancestral`` and ``random`` choose positions without looking at token values
(``value_independent``), so the sampler draws tokens only where it commits, and the
transition density is the product of per-token probabilities: the exact-weight setting.

**Ranking policies and weights.** ``low_confidence``, ``threshold`` and ``maskgit`` look at the
sampled candidates, so the positions a step commits depend on token values. The sampler keeps one
convention for all of them (``sampling.propose.Kernel``): the position rule is part of the
sampling *process*, not of the weight; a move is weighted by the committed tokens only,
``sum_committed [log target - log q]``. With the base kernel (no proposal, a potential that does
not propose, e.g. ``RewardTilt`` or ``SelfReward``) the ranking confidences are ``p_theta``'s, so
the target is the policy's own path law ``m(x0)`` (the law of the plain ranked sampler, not
``p0``) times the potential: ``m(x0) exp(r(x0) / alpha)`` for a reward tilt, checked by
enumeration for ``maskgit`` (``tests/test_maskgit_unmasking.py``). When a proposal changes the
confidences (``ProductTarget``, ``DenoiserProposal``, ``GradientProposal``), the positions follow
the proposal's ranking and are not re-weighted: the weights then correct the tokens given those
positions, and no closed-form target is claimed (use ``ancestral`` / ``random`` for exactness).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedules import Schedule, get_schedule

__all__ = [
    "UNMASKING_POLICIES",
    "Ancestral",
    "LowConfidence",
    "MaskGIT",
    "RandomUnmasking",
    "StepPlan",
    "Threshold",
    "UnmaskingPolicy",
    "get_unmasking",
    "plan_steps",
]


@dataclass(frozen=True)
class StepPlan:
    """One reverse step: global index ``step``; block ``[block_start, block_end)``;
    ``index`` of ``steps_in_block``; block-local times ``t > s``; ``progress = step / num_steps``."""

    step: int
    num_steps: int
    block_start: int
    block_end: int
    index: int
    steps_in_block: int

    @property
    def t(self) -> float:
        return 1.0 - self.index / self.steps_in_block

    @property
    def s(self) -> float:
        return 1.0 - (self.index + 1) / self.steps_in_block

    @property
    def opens_block(self) -> bool:
        return self.index == 0

    @property
    def closes_block(self) -> bool:
        return self.index == self.steps_in_block - 1


def plan_steps(
    num_steps: int, seq_len: int, start: int = 0, block_length: int | None = None
) -> list[StepPlan]:
    """The step plan for generating positions ``[start, seq_len)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= start < seq_len:
        raise ValueError(f"the prompt (length {start}) must be shorter than seq_len={seq_len}")
    span = seq_len - start
    block_length = span if block_length is None else block_length
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    num_blocks = math.ceil(span / block_length)
    if num_steps % num_blocks:
        raise ValueError(
            f"num_steps={num_steps} must be a multiple of the number of blocks ({num_blocks} blocks "
            f"of block_length={block_length} over {span} generated positions)"
        )
    per_block = num_steps // num_blocks
    plans = []
    for b in range(num_blocks):
        lo, hi = start + b * block_length, min(seq_len, start + (b + 1) * block_length)
        plans += [
            StepPlan(b * per_block + i, num_steps, lo, hi, i, per_block) for i in range(per_block)
        ]
    return plans


def _count(masked: Tensor, plan: StepPlan) -> Tensor:
    """``ceil(#masked / steps left)`` per row: the LLaDA even split, computed from the state."""
    left = plan.steps_in_block - plan.index
    return (masked.sum(-1) + left - 1) // left


def _top_count(scores: Tensor, masked: Tensor, count: Tensor) -> Tensor:
    """The ``count[r]`` highest-scoring masked positions of each row."""
    scores = scores.to(torch.float64).masked_fill(~masked, -torch.inf)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return masked & (rank < count.unsqueeze(-1))


class UnmaskingPolicy:
    """``select(masked, plan, u=None, confidence=None) -> commit`` with ``commit ⊆ masked``.
    Value-independent policies use uniforms ``u [R, L]``; the others use ``confidence [R, L]``
    (the probability of each position's sampled candidate), and also ``u`` (float64 uniforms
    from the rows' generators, drawn after the candidates) when ``needs_uniforms``."""

    value_independent: bool = True
    needs_uniforms: bool = False  # a ranking policy that also reads ``u`` (noisy ranking)
    may_finish_early: bool = False
    remasks: bool = False  # True: ``remask`` may turn clean tokens back into masks (ReMDM)

    def select(
        self,
        masked: Tensor,
        plan: StepPlan,
        u: Tensor | None = None,
        confidence: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def remask(self, clean: Tensor, masked: Tensor, plan: StepPlan, u: Tensor) -> Tensor:
        """The clean positions to turn back into masks (``remasks = True`` policies only)."""
        raise NotImplementedError


@dataclass
class Ancestral(UnmaskingPolicy):
    schedule: Schedule | str = "linear"

    def __post_init__(self) -> None:
        self.schedule = get_schedule(self.schedule)

    def select(self, masked, plan, u=None, confidence=None):
        if plan.closes_block:
            return masked.clone()
        t = torch.tensor(plan.t, dtype=torch.float64)
        p = self.schedule.unmask_probability(t, torch.tensor(plan.s, dtype=torch.float64))
        return masked & (u < p)


@dataclass
class RandomUnmasking(UnmaskingPolicy):
    def select(self, masked, plan, u=None, confidence=None):
        return _top_count(u, masked, _count(masked, plan))


@dataclass
class LowConfidence(UnmaskingPolicy):
    value_independent = False

    def select(self, masked, plan, u=None, confidence=None):
        return _top_count(confidence, masked, _count(masked, plan))


@dataclass
class Threshold(UnmaskingPolicy):
    threshold: float = 0.9
    value_independent = False
    may_finish_early = True

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    def select(self, masked, plan, u=None, confidence=None):
        if plan.closes_block:
            return masked.clone()
        at_least_one = _top_count(confidence, masked, masked.any(-1).long())
        return at_least_one | (masked & (confidence >= self.threshold))


@dataclass
class MaskGIT(UnmaskingPolicy):
    """MaskGIT / Meissonic low-confidence unmasking with confidence noise.

    At step ``k`` of the ``S`` steps of a block of ``n`` positions (times ``t -> s``), the
    ``floor(n * (1 - alpha(s)))`` masked positions with the lowest noisy confidence stay masked
    and the others are committed (at least one; all at the block's last step), where a
    position's noisy confidence is ``log c + tau_k * g``: ``c`` its sampled candidate's
    probability (clamped at ``1e-20``), ``g = -log(-log u)`` a Gumbel variable from the row's
    uniform ``u`` and ``tau_k = noise * (1 - k / (S - 1))`` (``linspace(noise, 0, S)``, as
    Meissonic's and aMUSEd's schedulers anneal their ``temperature=(2, 0)``). With
    ``schedule="maskgit_cosine"`` the masked share after step ``k`` is ``cos(pi/2 (k+1)/S)``,
    MaskGIT's cosine schedule. Top-``count`` of Gumbel-perturbed ``log c / tau`` is a
    Plackett-Luce draw with weights ``c^(1 / tau)``; ``noise=0`` ranks by confidence alone.

    Args:
        schedule: ``alpha(t)`` fixing the counts (the sampler passes its ``schedule``).
        noise: the initial noise temperature ``tau_0 >= 0`` (Meissonic's default 2; MaskGIT 4.5).
    """

    schedule: Schedule | str = "maskgit_cosine"
    noise: float = 2.0
    value_independent = False
    needs_uniforms = True

    def __post_init__(self) -> None:
        self.schedule = get_schedule(self.schedule)
        number = isinstance(self.noise, int | float) and not isinstance(self.noise, bool)
        if not (number and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"MaskGIT noise must be a finite number >= 0, got {self.noise!r}")

    def count(self, masked: Tensor, plan: StepPlan) -> Tensor:
        """Positions committed per row: ``#masked - floor(n (1 - alpha(s)))``, in ``[1, #masked]``."""
        left = masked.sum(-1)
        if plan.closes_block:
            return left
        share = 1.0 - self.schedule.alpha(torch.tensor(plan.s, dtype=torch.float64))
        keep = int(math.floor((plan.block_end - plan.block_start) * float(share) + 1e-9))
        return (left - keep).clamp_min(1).minimum(left)

    def noise_temperature(self, plan: StepPlan) -> float:
        """``tau_k``: ``noise`` at the block's first step, 0 at its last."""
        if plan.steps_in_block == 1:
            return 0.0
        return self.noise * (1.0 - plan.index / (plan.steps_in_block - 1))

    def select(self, masked, plan, u=None, confidence=None):
        scores = torch.log(confidence.to(torch.float64).clamp_min(1e-20))
        tau = self.noise_temperature(plan)
        if tau > 0:
            tiny = torch.finfo(torch.float64).tiny
            gumbel = -torch.log(-torch.log(u.to(torch.float64).clamp_min(tiny)))
            scores = scores + tau * gumbel
        return _top_count(scores, masked, self.count(masked, plan))


UNMASKING_POLICIES = {
    "ancestral": Ancestral,
    "random": RandomUnmasking,
    "low_confidence": LowConfidence,
    "threshold": Threshold,
    "maskgit": MaskGIT,
}


def get_unmasking(spec: str | UnmaskingPolicy, **kwargs) -> UnmaskingPolicy:
    """A policy by name (``kwargs`` go to its constructor) or the object itself."""
    if isinstance(spec, UnmaskingPolicy):
        return spec
    if spec not in UNMASKING_POLICIES:
        raise ValueError(
            f"unmasking={spec!r} is not known; choose one of: {', '.join(UNMASKING_POLICIES)}"
        )
    return UNMASKING_POLICIES[spec](**kwargs)
