"""One move of the sampler: choose positions, draw tokens, weigh the move (DESIGN.md §3).

``Kernel`` holds what a move needs: the unmasking policy, the potential (its per-token
``exponent`` and ``offset``), the proposal, temperature / top-p, and whether the rows drawn from
are normalized here (``rows_only``, see ``SMCSampler``). ``kernel.move(ctx, base_lp, index)``
returns ``(x_s, increment [R])`` where

    increment = sum_{committed i} [exponent * log p_theta(x_s^i) + offset(x_s^i) - log q(x_s^i)]

(the twist difference is added by the loop). The move also leaves the per-row sum of the
untempered ``log p_theta`` of the tokens it committed in ``ctx.confidence [R]`` (float64): the
step's term of a particle's whole-trajectory log-confidence (``SMCOutput.log_confidence``).
Positions come from the policy in one of two
modes: **value-independent** policies (``ancestral``, ``random``) choose positions from
uniforms and tokens are drawn only there; **ranking** policies (``low_confidence``,
``threshold``, ``maskgit``) draw a candidate at every masked position of the block and commit the
most confident (``maskgit``: after adding Gumbel noise from one more uniform per position). A
ranking move is weighted by its committed tokens only: the position rule belongs to the
sampling process, not to the weight (``diffusion.unmasking``'s docstring says what that targets). A remasking policy (ReMDM) then turns some clean generated tokens back into masks;
the base kernel and every proposal share the policy, so the probabilities of those position
events (unmask, stay masked, re-mask, keep) are the same under ``p`` and ``q`` and cancel in
``log p - log q`` (``diffusion.remasking.transition_log_prob`` is the full transition
probability, checked by enumeration in the tests).

``index [R]`` (the rows were just resampled and the log-probs not gathered): row ``r`` of
``x_t`` reads row ``index[r]`` of ``base_lp``; only the entries used are read through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..diffusion import UnmaskingPolicy, proposal_log_probs
from .context import StepContext
from .draws import entries, flat_index, inverse_cdf_at, row_source, source_rows

__all__ = ["Kernel"]


@dataclass
class Kernel:
    policy: UnmaskingPolicy
    potential: Any
    proposal: Any
    temperature: float = 1.0
    top_p: float = 1.0
    rows_only: bool = False

    @property
    def untempered(self) -> bool:
        return self.temperature == 1.0 and self.top_p == 1.0

    def proposal_log_probs(self, ctx: StepContext, base_lp: Tensor, offset: Tensor | None):
        """``(log q before temperature / top-p, whether to correct by log p - log q)``."""
        if self.proposal is not None:
            return self.proposal(ctx, base_lp), self.proposal.correct
        if self.potential.proposes:
            return torch.log_softmax(self.potential.exponent * base_lp + offset, dim=-1), True
        return base_lp, True

    def move(
        self, ctx: StepContext, base_lp: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x_s, increment [R] float64)`` of one step from ``ctx.x_t`` (module docstring)."""
        offset = self.potential.offset(ctx) if self.potential.has_offset else None
        base_kernel = self.proposal is None and not self.potential.proposes and offset is None
        if index is not None and not (base_kernel and self.untempered):
            base_lp, index = base_lp[index], None  # these read the whole tensor
        q_lp, correct = self.proposal_log_probs(ctx, base_lp, offset)
        log_q = q_lp if self.untempered else proposal_log_probs(q_lp, self.temperature, self.top_p)
        source = row_source(index, ctx.x_t.shape[1])
        masked = _masked_in_block(ctx)
        if self.policy.value_independent:
            at, tokens, lp = self._draw_at_positions(ctx, log_q, masked, source)
        else:
            at, tokens, lp = self._draw_ranked(ctx, log_q, q_lp, masked, source)
        x_s = ctx.x_t.clone(memory_format=torch.contiguous_format)
        x_s.view(-1)[at] = tokens
        if self.policy.remasks:
            self._remask(ctx, x_s, masked)
        if lp is None:  # the committed entries of [R, L, V] tensors, read in place
            lp = entries(base_lp, source_rows(at, source), tokens)
        reference = None
        if correct and not self.rows_only:
            reference = entries(log_q, source_rows(at, source), tokens)
        return x_s, self._weigh(ctx, at, tokens, lp, offset, reference)

    # ------------------------------------------------------------------ positions and tokens
    def _draw_at_positions(self, ctx, log_q, masked, source):
        """Value-independent policies: positions from uniforms, tokens drawn only there."""
        x = ctx.x_t
        u = ctx.rows.rand((ctx.num_particles, x.shape[1]), x.device).view_as(x)
        commit = self.policy.select(masked, ctx.plan, u=u)
        at = flat_index(commit)
        tokens, lp = inverse_cdf_at(ctx, log_q, commit, source_rows(at, source), self.rows_only)
        return at, tokens, lp

    def _draw_ranked(self, ctx, log_q, q_lp, masked, source):
        """Ranking policies: a candidate at every masked position, the most confident commit."""
        x = ctx.x_t
        R, L = x.shape
        V = q_lp.shape[-1]
        candidates = x.clone(memory_format=torch.contiguous_format)
        where = flat_index(masked)
        drawn, drawn_lp = inverse_cdf_at(
            ctx, log_q, masked, source_rows(where, source), self.rows_only
        )
        candidates.view(-1)[where] = drawn
        if self.rows_only:  # clean positions are never selected: their confidence is not read
            picked = torch.zeros((R, L), dtype=drawn_lp.dtype, device=x.device)
            picked.view(-1)[where] = drawn_lp
        elif source is None:
            picked = q_lp.gather(-1, candidates.clamp_max(V - 1).unsqueeze(-1)).squeeze(-1)
        else:
            picked = entries(q_lp, source, candidates.clamp_max(V - 1).view(-1)).view(R, L)
        u = None  # a noisy ranking (``maskgit``): uniforms from the rows' own generators
        if self.policy.needs_uniforms:
            u = ctx.rows.rand((ctx.num_particles, L), x.device).view_as(x)
        commit = self.policy.select(masked, ctx.plan, u=u, confidence=picked.exp())
        at = flat_index(commit)
        lp = picked.view(-1)[at] if self.rows_only else None
        return at, candidates.view(-1)[at], lp

    def _remask(self, ctx: StepContext, x_s: Tensor, masked: Tensor) -> None:
        """Turn clean generated tokens of ``x_t`` (inside the block) back into masks, in place."""
        plan, x = ctx.plan, ctx.x_t
        clean = torch.zeros_like(masked)
        clean[:, plan.block_start : plan.block_end] = ~masked[:, plan.block_start : plan.block_end]
        clean &= ctx.generated
        u = ctx.rows.rand((ctx.num_particles, x.shape[1]), x.device).view_as(x)
        x_s[self.policy.remask(clean, masked, plan, u)] = ctx.mask_id

    # ------------------------------------------------------------------ weight
    def _weigh(self, ctx, at, tokens, lp, offset, reference) -> Tensor:
        """``sum_committed [exponent * log p + offset - log q]`` per row (float64)."""
        lp = lp.to(torch.float64)
        target = self.potential.exponent * lp
        if offset is not None:
            target = target + entries(offset, at, tokens).to(torch.float64)
        reference = lp if reference is None else reference.to(torch.float64)
        R, L = ctx.x_t.shape
        increment = torch.zeros(R, dtype=torch.float64, device=ctx.x_t.device)
        increment.index_add_(0, at // L, target - reference)
        ctx.confidence = torch.zeros_like(increment).index_add_(0, at // L, lp)
        return increment


def _masked_in_block(ctx: StepContext) -> Tensor:
    x, plan = ctx.x_t, ctx.plan
    masked = torch.zeros_like(x, dtype=torch.bool)
    block = slice(plan.block_start, plan.block_end)
    masked[:, block] = x[:, block] == ctx.mask_id
    return masked
