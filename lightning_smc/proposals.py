"""Proposals ``q(x_s | x_t)``: the per-token distributions the sampler draws committed tokens from.

A proposal is called as ``proposal(ctx, base_log_probs) -> log_q [R, L, V]`` (normalized
log-probabilities, mask token at ``-inf``) and returns its *own* log-probabilities, so the
sampler can weight by ``log pi_step(x_s | x_t) - log q(x_s | x_t)`` exactly (DESIGN.md §3).
``extra_nfe`` counts the additional network calls it makes per step; ``correct`` says whether
the sampler applies the ``log p - log q`` correction.

- no proposal (``None``): the base kernel ``p_theta``; the potential may supply a default
  (``ProductTarget`` proposes from its normalized geometric mixture).
- ``DenoiserProposal(q_denoiser)``: any second denoiser, e.g. the base model with a LoRA
  adapter (SMCamot). ``correct=False`` reproduces the ICLR 2026 reference code, which weights
  particles by the twist alone and drops ``log p - log q``; the resulting target is then *not*
  ``p0 exp(r / alpha)`` unless ``q = p``. Use it only to compare with that code.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from .context import StepContext, denoiser_log_probs
from .models.base import Denoiser

__all__ = ["DenoiserProposal", "Proposal"]


class Proposal(Protocol):
    extra_nfe: int
    correct: bool

    def __call__(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor: ...


class DenoiserProposal:
    """Propose from another denoiser ``q``: ``log q(x0_i | x_t)`` at every position."""

    extra_nfe = 1

    def __init__(self, denoiser: Denoiser, correct: bool = True):
        self.denoiser = denoiser
        self.correct = correct

    def __call__(self, ctx: StepContext, base_log_probs: Tensor) -> Tensor:
        logits = self.denoiser(ctx.x_t, ctx.t, ctx.cond)
        if logits.shape != base_log_probs.shape:
            raise ValueError(
                f"DenoiserProposal: the proposal denoiser returned logits {tuple(logits.shape)} but the base "
                f"model gives {tuple(base_log_probs.shape)}; both must share the vocabulary and mask_id"
            )
        return denoiser_log_probs(logits, ctx.mask_id)
