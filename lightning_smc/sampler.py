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
   ``threshold``), a candidate at every masked position; a remasking policy (ReMDM,
   ``diffusion.remasking``) then turns some clean tokens back into masks;
5. **weight the move**: ``log_w += sum_committed [log pi(x_s) - log q(x_s)]`` (see ``potentials``).

After the last step ``log_w += log gamma_0(x_0) - log gamma_prev`` and ``log_Z += log mean
exp(log_w)``, so ``E[Ẑ] = Z`` including the initial twist. Randomness comes from one generator
per prompt (``smc.seeding``): the same prompt and seed give the same particles alone or in
any batch, and on any rank. Large per-step buffers (the ``[#masked, V]`` rows drawn from)
live in a ``sampling.context.Scratch`` reused by all steps of a run.

**Layout** (``sampling.layouts``): where the particles live. With ``layout="local"`` (default) this
process holds all ``R = B * N`` rows. With ``layout="sharded"`` each of ``W`` ranks holds
``B * N / W`` rows while ``log_w``, ``log_Z`` and the diagnostics stay global: the loop is the
same, and the layout's hooks (``add`` / ``settle`` the weight increments, ``follow`` the
ancestors after a resample, ``tokens`` at the end) do the communication.

The loop (``SMCSampler._run``) reads as its sub-steps: for each step of the **plan**
(``diffusion.plan_steps``), *evaluate* the denoiser, *weigh by the twist*, *maybe resample*,
*propose and weigh the move* (``sampling.propose.Kernel``), *record* (``sampling.trace``).
What the sampler is given is checked once per call (``sampling.checks``: argument types,
the denoiser's first output, ``cond``'s batch) and the log-weights after every increment: a
NaN or ``+inf`` weight, or a prompt left with no particle of finite weight, raises
``WeightError`` naming the step and the term. Potentials and proposals declare what they
need (``Potential.has_offset``, ``Potential.needs_log_probs``, ``extra_nfe``, a ``bind`` that
is a no-op on the base classes); the sampler never inspects their methods. Denoisers that
keep per-row state (a KV cache) define ``reorder_state(index)``; the sampler calls it on every movement of rows
(``sampling.cache.CachedDenoiser.reorder_state``).

Example::

    sampler = SMCSampler(denoiser, num_particles=16, num_steps=64, unmasking="low_confidence",
                         potential=SelfReward())
    out = sampler.sample(seq_len=64, batch_size=2, generator=torch.Generator().manual_seed(0))
    out.best()  # [2, 64], the highest-weight particle of each prompt
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .diffusion import Schedule, StepPlan, UnmaskingPolicy, get_unmasking, plan_steps
from .diffusion import proposal_log_probs as _check_sampling
from .models.base import Denoiser
from .potentials import Potential
from .proposals import Proposal
from .sampling.cache import CachedDenoiser
from .sampling.checks import WeightGuard, check_cond, check_count, check_sample_args, check_strategy
from .sampling.context import Scratch, StepContext, expand_rows, outputs_log_probs
from .sampling.eos import EndOfSequence, eos_ids_of
from .sampling.layouts import LocalParticles, get_layout
from .sampling.output import SMCOutput
from .sampling.propose import Kernel
from .sampling.start import (
    RunState,
    batch_and_device,
    initial_state,
    row_generators,
    stateful_networks,
)
from .sampling.trace import Trace
from .smc import RowGenerators, StepInfo, ess, get_resampling, get_strategy, log_mean_exp
from .smc.strategies import ResampleStrategy

__all__ = ["SMCSampler"]

Unmasking = Literal["ancestral", "random", "low_confidence", "threshold", "remdm", "maskgit"]
Resampling = Literal["systematic", "multinomial", "stratified", "residual"]


class SMCSampler:
    """Batched SMC over masked-diffusion denoising paths (``B`` prompts x ``N`` particles).

    Args:
        denoiser: an ``ls.Denoiser`` (``(x_t, t, cond) -> logits``).
        num_particles: ``N`` per prompt (1 with no potential = the plain sampler).
        num_steps: ``T`` reverse steps in total (shared equally by the blocks).
        unmasking: ``"ancestral"``, ``"random"``, ``"low_confidence"``, ``"threshold"``,
            ``"remdm"`` (ReMDM remasking with its defaults), ``"maskgit"`` (MaskGIT / Meissonic:
            the ``schedule``'s count, confidence + annealed Gumbel noise) or a policy object
            (``diffusion.UnmaskingPolicy``, e.g. ``ReMDM(eta=0.02, mode="max_cap")``,
            ``MaskGIT(schedule="maskgit_cosine", noise=4.5)``).
        block_length: semi-autoregressive block length (``None``: one block).
        temperature, top_p: applied to the proposal's logits (``temperature=0`` = greedy).
        potential: ``None`` | ``SelfReward`` | ``RewardTilt`` | ``ProductTarget``.
        proposal: ``None`` (base kernel) or any ``Proposal``, e.g. ``DenoiserProposal``.
        resampling: scheme name (``systematic``, ``multinomial``, ``stratified``, ``residual``).
        ess_threshold: resample when ``ESS < ess_threshold * N`` (the default strategy;
            ``None``: 0.5).
        resample_when: a strategy spec replacing that (``"always"``, ``"every:10"``,
            ``"block"``, ``"block:0.5"``, ``"never"``) or a strategy object; giving it together
            with ``ess_threshold`` is an error.
        schedule: ``alpha(t)`` for ``ancestral`` / ``remdm`` / ``maskgit`` unmasking (a name or a
            ``Schedule``).
        confidence_threshold: the ``threshold`` policy's confidence.
        cache: reuse a particle's logits when none of its tokens changed (MDLM's ``ddpm_cache``;
            needs a denoiser without time conditioning). ``out.nfe`` counts what was evaluated.
        progress_bar: show a progress bar over steps.
        stop_at_eos: finish a row once a completed block of it is all end tokens (the
            denoiser's ``eos_id``; the rest of the row is filled with end tokens and never
            drawn again) and stop when every row is finished (``sampling.eos``). Off by default.
        layout: where the particles live: ``"local"`` (this process) or ``"sharded"`` /
            ``ParticleShards(group)`` (split over the ranks of a ``torch.distributed`` group,
            global resampling; see ``lightning_smc.sampling.layouts``).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        num_particles: int = 1,
        num_steps: int = 128,
        unmasking: Unmasking | UnmaskingPolicy = "ancestral",
        block_length: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        potential: Potential | None = None,
        proposal: Proposal | None = None,
        resampling: Resampling = "systematic",
        ess_threshold: float | None = None,
        resample_when: str | ResampleStrategy | None = None,
        schedule: str | Schedule = "linear",
        confidence_threshold: float = 0.9,
        cache: bool = False,
        progress_bar: bool = False,
        layout: Literal["local", "sharded"] | LocalParticles = "local",
        stop_at_eos: bool = False,
    ):
        num_particles = check_count(num_particles, "num_particles")
        num_steps = check_count(num_steps, "num_steps")
        _check_sampling(torch.zeros(1, 2), temperature, top_p)  # validates both
        kwargs = {
            "ancestral": {"schedule": schedule},
            "remdm": {"schedule": schedule},
            "maskgit": {"schedule": schedule},
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
        self.proposal = proposal
        for value, base, name in (
            (potential, Potential, "potential"),
            (proposal, Proposal, "proposal"),
        ):
            if value is not None and not isinstance(value, base):
                raise TypeError(
                    f"{name}={type(value).__name__} is not an ls.{base.__name__}: subclass "
                    f"ls.{base.__name__} (its base class declares the defaults the sampler reads)"
                )
        self.potential.bind(denoiser)  # (after the type check)
        if proposal is not None:  # e.g. GradientProposal reads the tilt's reward and alpha
            proposal.bind(self.potential, denoiser)
        self.resample = get_resampling(resampling)
        self.strategy = get_strategy(check_strategy(ess_threshold, resample_when))
        self.progress_bar = progress_bar
        self.cache = cache
        self.followers = stateful_networks(denoiser, self.potential, proposal)
        CachedDenoiser(denoiser, cache, followers=self.followers)  # validates the combination
        self.layout = get_layout(layout)
        if not isinstance(stop_at_eos, bool):
            raise TypeError(f"stop_at_eos must be True or False, got {stop_at_eos!r}")
        self.stop_at_eos = stop_at_eos
        self.eos_ids = eos_ids_of(denoiser) if stop_at_eos else ()
        self.kernel = Kernel(
            self.policy, self.potential, proposal, temperature, top_p, self._normalizes_rows_only()
        )

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
        infill: bool = False,
    ) -> SMCOutput:
        """Draw ``N`` weighted particles for each of ``B`` prompts (see the module docstring).

        ``prompt [B, P]`` (``P < seq_len``, integer ids) fixes the first ``P`` tokens; with
        ``infill=True`` its ``mask_id`` entries are generated (infilling; blocks then start at
        the first free position of the batch), without it a prompt holding ``mask_id`` is refused.
        ``cond`` is a tensor ``[B, ...]`` or a dict / list of such tensors (class labels; text
        embeddings with pooled embeddings and micro-conditions): it is expanded to the particles
        and follows them. ``generator`` is one generator, or one per prompt for results
        independent of batch composition. ``record_path=True`` also returns every transition
        with its twists (``out.path``, an ``SMCPath``). With sharded particles every rank calls
        this with the same arguments and gets the same full output."""
        check_sample_args(seq_len, batch_size, prompt, generator, self.denoiser.mask_id, infill)
        B, device = batch_and_device(self.denoiser, batch_size, prompt, generator, device)
        check_cond(cond, B)
        rows = row_generators(generator, B, device)
        n = self.layout.start(self.num_particles, device, record_path)  # particles held here
        x, start = initial_state(self.denoiser, seq_len, B, prompt, device, n)
        plans = plan_steps(self.num_steps, seq_len, start, self.block_length)
        return self._run(x, plans, expand_rows(cond, n), rows, record_path)

    # ------------------------------------------------------------------ the loop
    def _run(
        self,
        x: Tensor,
        plans: list[StepPlan],
        cond: Any,
        rows: RowGenerators,
        record_path: bool = False,
    ) -> SMCOutput:
        B, T = len(rows), len(plans)
        n = x.shape[0] // B  # particles of each prompt held here
        resample_rows, rows = self.layout.generators(rows)
        network = CachedDenoiser(
            self.denoiser, self.cache, normalize=not self.kernel.rows_only, followers=self.followers
        )
        network.reorder_state(torch.arange(B, device=x.device).repeat_interleave(n))
        run = RunState.start(x, B, self.num_particles, T, record_path)
        run.guard = WeightGuard(self.layout, self.potential, self.proposal)
        scratch, generated = Scratch(), x == self.denoiser.mask_id
        eos = EndOfSequence(self.eos_ids, self.denoiser.mask_id, x.device) if self.eos_ids else None
        for plan in tqdm(plans, desc="SMC", disable=not self.progress_bar, leave=False):
            if self._block_finished(run, plan):
                continue
            run.guard.step = plan.step
            t = torch.full((run.x.shape[0],), plan.t, device=x.device)
            ctx = StepContext(run.x, t, plan, cond, rows, n, self.denoiser.mask_id, scratch)
            ctx.generated = generated
            base_lp = network(run.x, t, cond)  # evaluate
            run.steps += 1
            run.extra_evals += self.potential.extra_nfe + (
                self.proposal.extra_nfe if self.proposal is not None else 0
            )
            self._reweigh(run, self.potential.twist(ctx, base_lp))  # weigh by the twist
            base_lp, index = self._maybe_resample(run, ctx, base_lp, network, resample_rows)
            x_from = run.x
            run.x, increment = self._propagate(ctx, base_lp, index)  # propose, weigh the move
            self.layout.add(run.log_w, increment)
            self.layout.accumulate(run.log_confidence, ctx.confidence)
            run.guard.check(run.log_w, increment, "move")
            if run.path is not None:  # record
                run.path.add(x_from, run.x, plan, run.twist)
            if eos is not None and self._stop_at_eos(run, plan, eos, generated):
                break
        self._reweigh(run, self.potential.final_twist(run.x), "final twist")
        self.layout.settle(run.log_w)
        self.layout.settle_sum(run.log_confidence)
        run.guard.settled(run.log_w)
        nfe = self.layout.total(network.evaluations) / (B * self.num_particles) + run.extra_evals
        out = run.trace.finish(self.layout.tokens(run.x, B), run.log_w, nfe)
        out.log_confidence, out.steps = run.log_confidence, run.steps
        if run.path is not None:
            out.path = run.path.finish(run.twist)
        return out

    def _stop_at_eos(self, run: RunState, plan: StepPlan, eos: EndOfSequence, generated) -> bool:
        """Finish the rows whose block ended all end tokens (``sampling.eos``); ``True`` when no
        row has a mask left, so the remaining steps are skipped (their ESS is the current one)."""
        run.x = eos.finish_rows(run.x, plan, generated)
        if self.layout.any(not eos.all_done(run.x)):
            return False
        self.layout.settle(run.log_w)
        run.trace.ess[:, plan.step :] = ess(run.log_w).unsqueeze(1)
        return True

    def _block_finished(self, run: RunState, plan: StepPlan) -> bool:
        """A policy that may finish a block early (``threshold``) left nothing to do in it."""
        if not self.policy.may_finish_early or self.layout.any(self._block_open(run.x, plan)):
            return False
        self.layout.settle(run.log_w)
        run.trace.ess[:, plan.step - 1 :] = ess(run.log_w).unsqueeze(1)
        return True  # (the path records no transition: x does not move)

    def _reweigh(self, run: RunState, twist: Tensor | None, term: str = "twist") -> None:
        """``log_w += log gamma(x) - log gamma_prev`` for a new twist (``None``: no twist)."""
        if twist is not None:
            increment = twist - run.twist
            self.layout.add(run.log_w, increment)
            run.guard.check(run.log_w, increment, term)
            run.twist = twist
        if run.path is not None:
            run.path.reached(run.twist)

    def _maybe_resample(
        self,
        run: RunState,
        ctx: StepContext,
        base_lp: Tensor,
        network: CachedDenoiser,
        resample_rows: RowGenerators,
    ) -> tuple[Tensor, Tensor | None]:
        """Resample the prompts the strategy picks (never before the first step, never one
        particle); the rows follow their ancestors. Returns the log-probs and the ancestor row
        index to read them through (``None`` when they were gathered)."""
        k, N, T = ctx.plan.step, self.num_particles, len(run.trace.ess[0])
        if k == 0:
            return base_lp, None
        self.layout.settle(run.log_w)
        run.guard.settled(run.log_w)
        if N == 1:  # one particle: its ESS is 1 (as filled in) and it never resamples
            return base_lp, None
        run.trace.ess[:, k - 1] = ess(run.log_w)
        chosen = self.strategy(run.log_w, StepInfo(k, T, ctx.plan.opens_block))
        if not chosen.any():
            return base_lp, None
        index = self._resample(run.log_w, chosen, resample_rows, run.trace, k - 1)
        self.layout.settle_sum(run.log_confidence)  # the lineage's sum follows the ancestors
        run.log_confidence.copy_(run.log_confidence.gather(1, run.trace.ancestors[:, k - 1]))
        run.x, run.twist, base_lp, index = self.layout.follow(
            index, ctx, run.twist, base_lp, network
        )
        ctx.x_t = run.x
        return base_lp, index

    def _resample(
        self, log_w: Tensor, chosen: Tensor, rows: RowGenerators, trace: Trace, k: int
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

    def _propagate(
        self, ctx: StepContext, base_lp: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Propose ``x_s`` and weigh the move: ``(x_s, increment [R])`` (``Kernel.move``)."""
        return self.kernel.move(ctx, base_lp, index)

    def _proposal_log_probs(self, ctx, base_lp, offset) -> tuple[Tensor, bool]:
        return self.kernel.proposal_log_probs(ctx, base_lp, offset)

    def _normalizes_rows_only(self) -> bool:
        """Whether a step reads ``log p_theta`` only at the positions it draws from, so that the
        sampler may normalize just those rows of the logits: the base kernel, untempered, with
        a potential that reads no log-probs of its own (plain sampling, best-of-N, SR-SMC), for
        a denoiser whose outputs are not normalized already. Each row is normalized by the same
        ``log_softmax`` as the whole tensor, so results are identical (rows a sharded layout
        receives are evaluated through the same cache, so they arrive unnormalized too)."""
        return (
            not outputs_log_probs(self.denoiser)
            and self.proposal is None
            and not self.potential.proposes
            and not self.potential.needs_log_probs
            and self.temperature == 1.0
            and self.top_p == 1.0
        )

    # ------------------------------------------------------------------ setup
    def _block_open(self, x: Tensor, plan: StepPlan) -> bool:
        return bool((x[:, plan.block_start : plan.block_end] == self.denoiser.mask_id).any())
