"""``SMCSampler``: the one sampler behind training rollouts, evaluation callbacks and the CLI.

Notation (DESIGN.md §3): ``B`` prompts, ``N`` particles, ``R = B * N`` particle rows, ``L``
length, ``T`` steps; ``x [R, L]`` the state, ``log_w [B, N]`` float64 log-weights,
``log_Z [B]`` the running ``log Ẑ``. One step of the loop reads

1. ``logits = denoiser(x_t, t, cond)``, ``log p = log_softmax`` with the mask removed (used as
   they are when the denoiser declares ``outputs_log_probs``, as MDLM does; when a step reads
   ``log p`` only at the positions it draws from, only those rows are normalized, with the same
   per-row ``log_softmax``, see ``_normalizes_rows_only``);
2. **reweight by the twist**: ``log_w += log gamma_t(x_t) - log gamma_prev`` (``RewardTilt``);
3. **resample** the rows the strategy picks (never before the first step): ``log_Z +=
   log mean exp(log_w)``, particles, logits and twists follow their ancestors, ``log_w = 0``
   (without the cache, the ``[R, L, V]`` log-probs are not gathered: step 4 reads the rows it
   needs through the ancestor index, unless a proposal, offset, temperature or top-p needs
   the whole tensor);
4. **propose**: ``log q`` from the proposal (base kernel by default), temperature / top-p
   applied; the unmasking policy picks positions; tokens drawn by ``inverse_cdf`` with one
   float64 uniform each (``diffusion.categorical``) at the committed positions (``ancestral``,
   ``random``), or, for policies that rank sampled candidates (``low_confidence``,
   ``threshold``), a candidate at every masked position;
5. **weight the move**: ``log_w += sum_committed [log pi(x_s) - log q(x_s)]`` (see ``potentials``).

After the last step ``log_w += log gamma_0(x_0) - log gamma_prev`` and ``log_Z += log mean
exp(log_w)``, so ``E[Ẑ] = Z`` including the initial twist. Randomness comes from one generator
per prompt (``smc.seeding``): the same prompt and seed give the same particles alone or in
any batch, and on any rank. Large per-step buffers (the ``[#masked, V]`` rows drawn from)
live in a ``context.Scratch`` reused by all steps of a run.

**Layout** (``sharding``): where the particles live. With ``layout="local"`` (default) this
process holds all ``R = B * N`` rows. With ``layout="sharded"`` each of ``W`` ranks holds
``B * N / W`` rows while ``log_w``, ``log_Z`` and the diagnostics stay global: the loop is the
same, and the layout's hooks (``add`` / ``settle`` the weight increments, ``follow`` the
ancestors after a resample, ``tokens`` at the end) do the communication.

Example::

    sampler = SMCSampler(denoiser, num_particles=16, num_steps=64, unmasking="low_confidence",
                         potential=SelfReward())
    out = sampler.sample(seq_len=64, batch_size=2, generator=torch.Generator().manual_seed(0))
    out.best()  # [2, 64], the highest-weight particle of each prompt
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cache import CachedDenoiser
from .context import Scratch, StepContext, expand_rows, outputs_log_probs
from .diffusion import (
    StepPlan,
    get_unmasking,
    inverse_cdf,
    plan_steps,
    proposal_log_probs,
)
from .models.base import Denoiser
from .output import SMCOutput, SMCPath
from .potentials import Potential
from .proposals import Proposal
from .sharding import LocalParticles, get_layout
from .smc import RowGenerators, StepInfo, ess, get_resampling, get_strategy, log_mean_exp

__all__ = ["SMCSampler"]


class SMCSampler:
    """Batched SMC over masked-diffusion denoising paths (``B`` prompts x ``N`` particles).

    Args:
        denoiser: an ``ls.Denoiser`` (``(x_t, t, cond) -> logits``).
        num_particles: ``N`` per prompt (1 with no potential = the plain sampler).
        num_steps: ``T`` reverse steps in total (shared equally by the blocks).
        unmasking: ``"ancestral"``, ``"random"``, ``"low_confidence"``, ``"threshold"`` or a policy.
        block_length: semi-autoregressive block length (``None``: one block).
        temperature, top_p: applied to the proposal's logits (``temperature=0`` = greedy).
        potential: ``None`` | ``SelfReward`` | ``RewardTilt`` | ``ProductTarget``.
        proposal: ``None`` (base kernel) or any ``Proposal``, e.g. ``DenoiserProposal``.
        resampling: scheme name (``systematic``, ``multinomial``, ``stratified``, ``residual``).
        ess_threshold: resample when ``ESS < ess_threshold * N`` (the default strategy).
        resample_when: a strategy spec overriding that (``"always"``, ``"every:10"``,
            ``"block"``, ``"block:0.5"``, ``"never"``) or a strategy object.
        schedule: ``alpha(t)`` for ``ancestral`` unmasking.
        confidence_threshold: the ``threshold`` policy's confidence.
        cache: reuse a particle's logits when none of its tokens changed (MDLM's ``ddpm_cache``;
            needs a denoiser without time conditioning). ``out.nfe`` counts what was evaluated.
        progress_bar: show a progress bar over steps.
        layout: where the particles live: ``"local"`` (this process) or ``"sharded"`` /
            ``ParticleShards(group)`` (split over the ranks of a ``torch.distributed`` group,
            global resampling; see ``lightning_smc.sharding``).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        num_particles: int = 1,
        num_steps: int = 128,
        unmasking: Any = "ancestral",
        block_length: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        potential: Potential | None = None,
        proposal: Proposal | None = None,
        resampling: str = "systematic",
        ess_threshold: float = 0.5,
        resample_when: Any = None,
        schedule: Any = "linear",
        confidence_threshold: float = 0.9,
        cache: bool = False,
        progress_bar: bool = False,
        layout: str | LocalParticles = "local",
    ):
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        proposal_log_probs(torch.zeros(1, 2), temperature, top_p)  # validates both
        kwargs = {
            "ancestral": {"schedule": schedule},
            "threshold": {"threshold": confidence_threshold},
        }
        self.policy = get_unmasking(
            unmasking, **kwargs.get(unmasking, {}) if isinstance(unmasking, str) else {}
        )
        self.denoiser = denoiser
        self.num_particles, self.num_steps, self.block_length = (
            num_particles,
            num_steps,
            block_length,
        )
        self.temperature, self.top_p = temperature, top_p
        self.potential = potential if potential is not None else Potential()
        if hasattr(self.potential, "bind"):
            self.potential.bind(denoiser)
        self.proposal = proposal
        if hasattr(proposal, "bind"):  # e.g. GradientProposal reads the tilt's reward and alpha
            proposal.bind(self.potential, denoiser)
        self.resample = get_resampling(resampling)
        self.strategy = get_strategy(
            resample_when if resample_when is not None else f"ess:{ess_threshold}"
        )
        self.progress_bar = progress_bar
        self.cache = cache
        CachedDenoiser(denoiser, cache)  # validates cache against the denoiser
        self.layout = get_layout(layout)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def sample(
        self,
        seq_len: int,
        batch_size: int | None = None,
        prompt: Tensor | None = None,
        cond: Any = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        record_path: bool = False,
    ) -> SMCOutput:
        """Draw ``N`` weighted particles for each of ``B`` prompts (see the module docstring).

        ``prompt [B, P]`` (``P < seq_len``) fixes the first ``P`` tokens; its ``mask_id`` entries are
        generated (infilling; blocks then start at the first free position of the batch); ``cond`` has leading dimension ``B``; ``generator`` is one generator, or one per
        prompt for results independent of batch composition. ``record_path=True`` also returns
        every transition with its twists (``out.path``, an ``SMCPath``). With sharded particles
        every rank calls this with the same arguments and gets the same full output."""
        B, device = self._batch_and_device(batch_size, prompt, generator, device)
        rows = self._row_generators(generator, B, device)
        n = self.layout.start(self.num_particles, device, record_path)  # particles held here
        x, start = self._initial_state(seq_len, B, prompt, device, n)
        plans = plan_steps(self.num_steps, seq_len, start, self.block_length)
        return self._run(x, plans, expand_rows(cond, n), rows, record_path)

    # ------------------------------------------------------------------ loop
    def _run(
        self,
        x: Tensor,
        plans: list[StepPlan],
        cond: Any,
        rows: RowGenerators,
        record_path: bool = False,
    ) -> SMCOutput:
        B, N, T = len(rows), self.num_particles, len(plans)
        layout, n = self.layout, x.shape[0] // B  # n: particles of each prompt held here
        resample_rows, rows = layout.generators(rows)
        trace = _Trace.empty(B, N, T, x.device)
        log_w, prev_twist = (
            trace.new_weights(),
            torch.zeros(B * n, dtype=torch.float64, device=x.device),
        )
        rows_only = self._normalizes_rows_only()
        network = CachedDenoiser(self.denoiser, self.cache, normalize=not rows_only)
        scratch = Scratch()
        extra_evals = 0
        path = _PathRecorder() if record_path else None
        for plan in tqdm(plans, desc="SMC", disable=not self.progress_bar, leave=False):
            k = plan.step
            if self.policy.may_finish_early and not layout.any(self._block_open(x, plan)):
                layout.settle(log_w)
                trace.ess[:, k - 1 :] = ess(log_w).unsqueeze(1)  # nothing left in this block
                continue  # (the path records no transition: x does not move)
            t = torch.full((x.shape[0],), plan.t, device=x.device)
            ctx = StepContext(x, t, plan, cond, rows, n, self.denoiser.mask_id, scratch)
            base_lp = network(x, t, cond)
            extra_evals += self.potential.extra_nfe + getattr(self.proposal, "extra_nfe", 0)
            twist = self.potential.twist(ctx, base_lp)
            if twist is not None:
                layout.add(log_w, twist - prev_twist)
                prev_twist = twist
            if path is not None:
                path.reached(prev_twist)
            index = None
            if k > 0:
                layout.settle(log_w)
            if k > 0 and N > 1:  # one particle: its ESS is 1 (as filled in) and it never resamples
                trace.ess[:, k - 1] = ess(log_w)
                chosen = self.strategy(log_w, StepInfo(k, T, plan.opens_block))
                if chosen.any():
                    index = self._resample(log_w, chosen, resample_rows, trace, k - 1)
                    x, prev_twist, base_lp, index = layout.follow(
                        index, ctx, prev_twist, base_lp, network
                    )
                    ctx.x_t = x
            x_from = x
            x, increment = self._propagate(ctx, base_lp, index, rows_only)
            layout.add(log_w, increment)
            if path is not None:
                path.add(x_from, x, plan, prev_twist)
        final = self.potential.final_twist(x)
        if final is not None:
            layout.add(log_w, final - prev_twist)
            prev_twist = final
        layout.settle(log_w)
        nfe = layout.total(network.evaluations) / (B * N) + extra_evals
        out = trace.finish(layout.tokens(x, B), log_w, nfe)
        if path is not None:
            out.path = path.finish(prev_twist)
        return out

    def _resample(
        self, log_w: Tensor, chosen: Tensor, rows: RowGenerators, trace: _Trace, k: int
    ) -> Tensor:
        """Resample the chosen rows in place after step ``k``; returns the flat row index to gather
        (``b * N + ancestor``: global rows, whatever the layout)."""
        N = self.num_particles
        for b in chosen.nonzero().flatten().tolist():
            trace.ancestors[b, k] = self.resample(log_w[b], N, rows.generator(b)).to(log_w.device)
            trace.pre_best[b, k] = log_w[b].argmax()
            trace.log_Z[b] += log_mean_exp(log_w[b])
            log_w[b] = 0.0
        trace.resampled[:, k] = chosen
        offsets = torch.arange(log_w.shape[0], device=log_w.device).unsqueeze(1) * N
        return (trace.ancestors[:, k] + offsets).flatten()

    def _normalizes_rows_only(self) -> bool:
        """Whether a step reads ``log p_theta`` only at the positions it draws from, so that the
        sampler may normalize just those rows of the logits: the base kernel, untempered, with
        no offset and no twist reading the log-probs (plain sampling, best-of-N, SR-SMC), for a
        denoiser whose outputs are not normalized already. Each row is normalized by the same
        ``log_softmax`` as the whole tensor, so results are identical (rows a sharded layout
        receives are evaluated through the same cache, so they arrive unnormalized too)."""
        potential = type(self.potential)
        return (
            not outputs_log_probs(self.denoiser)
            and self.proposal is None
            and not self.potential.proposes
            and potential.offset is Potential.offset
            and potential.twist is Potential.twist
            and self.temperature == 1.0
            and self.top_p == 1.0
        )

    def _propagate(
        self,
        ctx: StepContext,
        base_lp: Tensor,
        index: Tensor | None = None,
        rows_only: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Commit tokens at the policy's positions; returns ``(x_s, increment [R])``.

        ``index [R]``: the rows were just resampled and row ``r`` of ``base_lp`` belongs to particle
        ``index[r]``'s ancestor, i.e. the log-probs of ``ctx.x_t`` are ``base_lp[index]``; only the
        entries used are read through it (every value is the same as after that gather).
        ``rows_only`` (see ``_normalizes_rows_only``): ``base_lp`` holds mask-removed logits and
        the rows drawn from are normalized here."""
        x, plan = ctx.x_t, ctx.plan
        offset = self.potential.offset(ctx)
        untempered = self.temperature == 1.0 and self.top_p == 1.0
        base_kernel = self.proposal is None and not self.potential.proposes and offset is None
        if index is not None and not (base_kernel and untempered):
            base_lp, index = base_lp[index], None  # these read the whole tensor
        q_lp, correct = self._proposal_log_probs(ctx, base_lp, offset)
        log_q = q_lp if untempered else proposal_log_probs(q_lp, self.temperature, self.top_p)
        R, L = x.shape
        V = base_lp.shape[-1]
        if index is None:
            source = None
        else:  # flat position r * L + l of x_t -> row index[r] * L + l of base_lp
            source = (index.unsqueeze(1) * L + torch.arange(L, device=x.device)).reshape(-1)
        block = slice(plan.block_start, plan.block_end)
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[:, block] = x[:, block] == ctx.mask_id
        lp = None  # log p_theta of the committed tokens, when read from normalized rows here
        if self.policy.value_independent:
            u = ctx.rows.rand((ctx.num_particles, L), x.device).view_as(x)
            commit = self.policy.select(masked, plan, u=u)
            at = _flat_index(commit)
            tokens, lp = _inverse_cdf_at(ctx, log_q, commit, _source(at, source), rows_only)
        else:
            candidates = x.clone(memory_format=torch.contiguous_format)
            where = _flat_index(masked)
            drawn, drawn_lp = _inverse_cdf_at(ctx, log_q, masked, _source(where, source), rows_only)
            candidates.view(-1)[where] = drawn
            if rows_only:  # clean positions are never selected: their confidence is not read
                picked = torch.zeros((R, L), dtype=drawn_lp.dtype, device=x.device)
                picked.view(-1)[where] = drawn_lp
            elif source is None:
                picked = q_lp.gather(-1, candidates.clamp_max(V - 1).unsqueeze(-1)).squeeze(-1)
            else:
                picked = _entries(q_lp, source, candidates.clamp_max(V - 1).view(-1)).view(R, L)
            confidence = picked.exp()
            commit = self.policy.select(masked, plan, confidence=confidence)
            at = _flat_index(commit)
            tokens = candidates.view(-1)[at]
            if rows_only:
                lp = picked.view(-1)[at]
        x_s = x.clone(memory_format=torch.contiguous_format)
        x_s.view(-1)[at] = tokens
        if lp is None:
            # the committed entries of [R, L, V] tensors, read in place (no [#committed, V] copies)
            lp = _entries(base_lp, _source(at, source), tokens)
        lp = lp.to(torch.float64)
        target = self.potential.exponent * lp
        if offset is not None:
            target = target + _entries(offset, at, tokens).to(torch.float64)
        if correct and not rows_only:
            reference = _entries(log_q, _source(at, source), tokens).to(torch.float64)
        else:  # (rows_only: the base kernel, log q = log p)
            reference = lp
        increment = torch.zeros(R, dtype=torch.float64, device=x.device)
        increment.index_add_(0, at // L, target - reference)
        return x_s, increment

    def _proposal_log_probs(self, ctx, base_lp, offset) -> tuple[Tensor, bool]:
        if self.proposal is not None:
            return self.proposal(ctx, base_lp), self.proposal.correct
        if self.potential.proposes:
            return torch.log_softmax(self.potential.exponent * base_lp + offset, dim=-1), True
        return base_lp, True

    # ------------------------------------------------------------------ setup
    def _block_open(self, x: Tensor, plan: StepPlan) -> bool:
        return bool((x[:, plan.block_start : plan.block_end] == self.denoiser.mask_id).any())

    def _batch_and_device(self, batch_size, prompt, generator, device):
        B = batch_size
        if prompt is not None:
            if prompt.dim() != 2:
                raise ValueError(
                    f"prompt must be a LongTensor [batch, prompt_len], got shape {tuple(prompt.shape)}"
                )
            if B is not None and prompt.shape[0] != B:
                raise ValueError(f"batch_size={B} but prompt has {prompt.shape[0]} rows")
            B = prompt.shape[0]
        if B is None:
            B = len(generator) if isinstance(generator, Sequence) else 1
        if B < 1:
            raise ValueError(f"batch_size must be >= 1, got {B}")
        if device is None:
            device = prompt.device if prompt is not None else _module_device(self.denoiser)
        return B, torch.device(device)

    def _row_generators(self, generator, B: int, device) -> RowGenerators:
        if isinstance(generator, Sequence):
            if len(generator) != B:
                raise ValueError(
                    f"got {len(generator)} generators for {B} prompts; pass one per prompt or a single one"
                )
            return RowGenerators(list(generator))
        return RowGenerators.split(generator, B, device)

    def _initial_state(
        self, seq_len: int, B: int, prompt: Tensor | None, device, particles: int
    ) -> tuple[Tensor, int]:
        """Fully masked rows (prompt in front), ``particles`` rows per prompt."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        mask_id, V = self.denoiser.mask_id, self.denoiser.vocab_size
        x = torch.full((B, seq_len), mask_id, dtype=torch.long, device=device)
        start = 0
        if prompt is not None:
            if prompt.shape[1] >= seq_len:
                raise ValueError(
                    f"prompt length {prompt.shape[1]} leaves nothing to generate with seq_len={seq_len}"
                )
            if prompt.min() < 0 or prompt.max() >= V:
                raise ValueError(f"prompt token ids must be in [0, vocab_size={V})")
            x[:, : prompt.shape[1]] = prompt.to(device)
            # Generation starts at the first free position of any prompt: masked prompt entries
            # are generated (infilling); blocks tile [start, seq_len).
            start = int((x == mask_id).any(0).nonzero()[0])
        return x.repeat_interleave(particles, dim=0), start


def _flat_index(mask: Tensor) -> Tensor:
    """Indices of the True entries of ``mask [R, L]`` in the flattened ``[R * L]`` (row-major)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _source(at: Tensor, source: Tensor | None) -> Tensor:
    """Flat positions ``at`` of ``x_t`` as flat rows of the (not gathered) log-probs."""
    return at if source is None else source[at]


def _entries(values: Tensor, at: Tensor, tokens: Tensor) -> Tensor:
    """``values[r, l, tokens]`` at the flat positions ``at = r * L + l`` of ``values [R, L, V]``."""
    return values.reshape(-1, values.shape[-1])[at, tokens]


def _gather_rows(ctx: StepContext, log_q: Tensor, rows_at: Tensor) -> Tensor:
    """Rows ``rows_at`` of ``log_q [.., V]`` as ``[M, V]`` (in a ``ctx.scratch`` buffer if any)."""
    flat = log_q.reshape(-1, log_q.shape[-1])
    if ctx.scratch is None:
        return flat[rows_at]
    rows = ctx.scratch.get(
        "log_q_rows", (rows_at.numel(), flat.shape[-1]), log_q.dtype, log_q.device
    )
    return torch.index_select(flat, 0, rows_at, out=rows)


def _normalized(ctx: StepContext, rows: Tensor) -> Tensor:
    """``log_softmax`` of gathered logit rows (into a scratch buffer if any)."""
    if ctx.scratch is None:
        return torch.log_softmax(rows, dim=-1)
    out = ctx.scratch.get("normalized_rows", rows.shape, rows.dtype, rows.device)
    return torch.log_softmax(rows, dim=-1, out=out)


def _inverse_cdf_at(
    ctx: StepContext, log_q: Tensor, where: Tensor, rows_at: Tensor, normalize: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Tokens at the True entries of ``where [R, L]`` (rows ``rows_at`` of ``log_q``), one
    float64 uniform each from the prompt's generator: ``inverse_cdf(exp(log_q[where]), u)``, the
    ``[M, V]`` probabilities computed in a ``ctx.scratch`` buffer. ``normalize``: ``log_q`` holds
    logits; the gathered rows are normalized first and the tokens' log-probabilities are
    returned too (else ``None``)."""
    rows = _gather_rows(ctx, log_q, rows_at)
    u = ctx.rand_at(where)
    if not normalize:  # (rows is a copy: exponentiate it in place)
        return inverse_cdf(rows.exp_(), u), None
    log_p = _normalized(ctx, rows)
    tokens = inverse_cdf(torch.exp(log_p, out=rows), u)
    return tokens, log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _PathRecorder:
    """Collects ``SMCPath`` transitions; ``twist_to`` of a step is the next twist computed for
    its output (before any resample), or the final twist."""

    def __init__(self) -> None:
        self.x_from, self.x_to, self.t, self.step, self.tw_from, self.tw_to = [], [], [], [], [], []

    def add(self, x_from: Tensor, x_to: Tensor, plan: StepPlan, twist_from: Tensor) -> None:
        self.x_from.append(x_from)
        self.x_to.append(x_to)
        self.t.append(plan.t)
        self.step.append(plan.step)
        self.tw_from.append(twist_from)

    def reached(self, twist: Tensor) -> None:
        """The twist of the last recorded output (pre-resample), once it is known."""
        if len(self.tw_to) < len(self.tw_from):
            self.tw_to.append(twist)

    def finish(self, final_twist: Tensor) -> SMCPath:
        self.reached(final_twist)
        device = self.x_to[-1].device
        return SMCPath(
            torch.stack(self.x_from),
            torch.stack(self.x_to),
            torch.tensor(self.t, dtype=torch.float32, device=device),
            torch.tensor(self.step, dtype=torch.long, device=device),
            torch.stack(self.tw_from),
            torch.stack(self.tw_to),
        )


@dataclass
class _Trace:
    """Diagnostics being filled in during a run (see ``SMCOutput``)."""

    ess: Tensor
    resampled: Tensor
    ancestors: Tensor
    pre_best: Tensor
    log_Z: Tensor

    @classmethod
    def empty(cls, B: int, N: int, T: int, device) -> _Trace:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            ess=torch.full((B, T), float(N), **f64),
            resampled=torch.zeros(B, T, dtype=torch.bool, device=device),
            ancestors=torch.arange(N, device=device).repeat(B, T, 1),
            pre_best=torch.zeros(B, T, dtype=torch.long, device=device),
            log_Z=torch.zeros(B, **f64),
        )

    def new_weights(self) -> Tensor:
        return torch.zeros(
            self.ancestors.shape[0],
            self.ancestors.shape[2],
            dtype=torch.float64,
            device=self.log_Z.device,
        )

    def finish(self, tokens: Tensor, log_w: Tensor, nfe: float) -> SMCOutput:
        self.ess[:, -1] = ess(log_w)
        self.log_Z += log_mean_exp(log_w)
        out = SMCOutput(
            tokens,
            log_w - torch.logsumexp(log_w, -1, keepdim=True),
            self.log_Z,
            self.ess,
            self.resampled,
            self.ancestors,
            nfe,
            torch.zeros_like(self.log_Z, dtype=torch.long),
        )
        lineage = out.lineage(out.log_weights.argmax(-1))
        out.overtakes = (self.resampled & (lineage != self.pre_best)).sum(-1)
        return out


def _module_device(denoiser: Any) -> torch.device:
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")
