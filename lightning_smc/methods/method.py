"""``Method``: sampler settings + target + proposal + answer rule, and ``build_sampler``.

``build_sampler(method, denoiser, reward=, amortized=, guide=)`` is the one builder of the
shared ``SMCSampler`` (used by the ``sample`` CLI, ``RewardEvaluation`` and
``AmortizedProposalModule.rollout_sampler``); ``match_budget`` sets the steps for an NFE budget;
``answers`` picks one sequence per prompt; ``complete_prompts`` decodes text prompts with a
diffusion LLM (left-padded batches, one answer per prompt, cut at the first end token). Example::

    method = Method(name="SR-SMC", num_particles=4, num_steps=32, potential=SelfRewardSpec())
    out = build_sampler(method, denoiser).sample(32, batch_size=2, generator=g)
    answers(out, method)  # [2, 32]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .. import dist
from ..sampler import Resampling, SMCSampler, Unmasking
from ..sampling.output import SMCOutput
from ..smc import derive_seed
from .specs import PotentialSpec, ProposalSpec, RewardTiltSpec, Spec, as_spec

#: the answer rules of ``Method.select``
SELECT_RULES = ("weight", "reward", "confidence")

__all__ = [
    "SELECT_RULES",
    "Method",
    "answers",
    "build_sampler",
    "evaluations_per_step",
    "match_budget",
]


# ------------------------------------------------------------------------------ method
@dataclass
class Method:
    """A sampling method (see the module docstring for the presets and the specs).

    The defaults are the plain sampler (one particle, no potential).

    Args:
        name: label in logs and tables.
        num_particles, num_steps, unmasking, block_length, temperature, top_p, resampling,
            ess_threshold, resample_when, schedule, confidence_threshold, cache: as in
            ``SMCSampler`` (``schedule``: ``alpha(t)`` of ``ancestral`` / ``remdm``, e.g.
            ``maskgit_cosine`` for image-token models).
        potential: ``None`` (the plain target), a ``PotentialSpec`` or its registry name.
        proposal: ``None`` (the base kernel), a ``ProposalSpec`` or its registry name; it
            steers towards a reward, so it needs ``RewardTiltSpec``.
        select: ``"weight"`` (highest-weight particle), ``"reward"`` (best-of-N) or
            ``"confidence"`` (highest whole-trajectory log-confidence, ``SMCOutput.
            log_confidence``: SR-SMC's answer in its reference code).
        stop_at_eos: as in ``SMCSampler``: finish a row at its first all-end-token block and
            stop when every row is finished (diffusion LLMs; the denoiser declares ``eos_id``).
        kv_cache: Fast-dLLM's KV cache for block decoding of LLaDA / Dream
            (``models.dllm_cache.CachedDiffusionLM``): ``"prefix"``, ``"dual"`` or ``None``;
            its blocks are ``block_length``.
        shard_particles: split each prompt's ``num_particles`` over the ranks of the default
            process group (``SMCSampler(layout="sharded")``, global resampling): for ``N`` too
            large for one device. Every rank then samples every prompt and holds the same
            answers. In a single process this is the local layout, bit for bit.
    """

    name: str = "plain"
    num_particles: int = 1
    num_steps: int = 64
    unmasking: Unmasking = "ancestral"
    block_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    potential: PotentialSpec | Literal["tilt", "self_reward", "product"] | None = None
    proposal: ProposalSpec | Literal["gradient", "amortized"] | None = None
    resampling: Resampling = "systematic"
    ess_threshold: float | None = None  # None: 0.5 (SMCSampler); not with resample_when
    resample_when: str | None = None
    schedule: Literal["linear", "cosine", "maskgit_cosine", "loglinear"] = "linear"
    confidence_threshold: float = 0.9
    select: Literal["weight", "reward", "confidence"] = "weight"
    cache: bool = False
    shard_particles: bool = False
    stop_at_eos: bool = False
    kv_cache: Literal["prefix", "dual"] | None = None

    def __post_init__(self) -> None:
        try:
            self.potential = as_spec(self.potential, PotentialSpec, "potential")
            self.proposal = as_spec(self.proposal, ProposalSpec, "proposal")
        except ValueError as err:
            raise ValueError(f"method {self.name!r}: {err}") from None
        if self.select not in SELECT_RULES:
            raise ValueError(
                f"method {self.name!r}: select={self.select!r} is not 'weight', 'reward' or "
                "'confidence' (highest weight, highest reward, highest whole-trajectory "
                "log-confidence)"
            )
        if self.kv_cache not in (None, "prefix", "dual"):
            raise ValueError(
                f"method {self.name!r}: kv_cache={self.kv_cache!r} is not 'prefix', 'dual' or "
                "null (no KV cache)"
            )
        if self.kv_cache is not None and self.cache:
            raise ValueError(
                f"method {self.name!r}: cache: true (reuse unchanged rows' logits) and "
                f"kv_cache: {self.kv_cache} (per-row KV state, every row evaluated) together; "
                "keep one of them"
            )
        if self.potential is None and self.num_particles > 1 and self.select == "weight":
            raise ValueError(
                f"method {self.name!r}: {self.num_particles} particles without a potential all "
                f"weigh the same, so select: weight returns particle 0 at {self.num_particles}x "
                "the cost; use select: reward (best-of-N, needs a reward), num_particles: 1 (the "
                "plain sampler) or a potential (e.g. potential: self_reward for SR-SMC)"
            )
        if self.proposal is not None and not isinstance(self.potential, RewardTiltSpec):
            raise ValueError(
                f"method {self.name!r}: proposal {type(self.proposal).__name__} steers towards a "
                "reward; it needs potential: RewardTiltSpec"
            )

    @property
    def needs_reward(self) -> bool:
        return (
            bool(self.potential is not None and self.potential.needs_reward)
            or self.select == "reward"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as in a config file (specs as ``class_path`` / ``init_args``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.to_dict() if isinstance(v, Spec) else v for k, v in out.items()}


def evaluations_per_step(method: Method) -> int:
    """Denoiser evaluations per particle per step: 1, plus the ``extra_nfe`` its potential and
    proposal classes declare (the amortized proposal: 1; the gradient proposal adds a reward
    backward pass, not a network call)."""
    return 1 + sum(s.target.extra_nfe for s in (method.potential, method.proposal) if s is not None)


def match_budget(method: Method, nfe_budget: int) -> Method:
    """``method`` with the number of steps that spends ``nfe_budget`` network evaluations per
    answer (``num_particles * num_steps * evaluations_per_step``), so methods compare at equal
    compute: e.g. a budget of 256 gives the base sampler 256 steps and SR-SMC with N=4 64
    steps. A budget too small for one step per particle is an error."""
    per_step = method.num_particles * evaluations_per_step(method)
    steps = nfe_budget // per_step
    if steps < 1:
        raise ValueError(
            f"method {method.name!r}: an NFE budget of {nfe_budget} is less than one step of "
            f"{method.num_particles} particle(s) x {evaluations_per_step(method)} evaluation(s)"
        )
    return dataclasses.replace(method, num_steps=steps)


def build_sampler(
    method: Method,
    denoiser: Any,
    reward: Any = None,
    amortized: Any = None,
    progress_bar: bool = False,
    guide: Any = None,
) -> SMCSampler:
    """The shared ``SMCSampler`` for ``method`` on ``denoiser`` (``p_theta``).

    ``reward`` is bound into the potential; ``amortized``: the trained LoRA proposal for
    ``DenoiserProposalSpec`` (else its ``adapter`` is loaded onto a copy of ``denoiser``, which
    stays unadapted); ``guide``: a differentiable reward whose gradient drives
    ``GradientProposalSpec`` in place of the target's reward (a surrogate for a reward without
    gradients; the target and its weights do not change)."""
    if method.needs_reward and reward is None:
        raise ValueError(f"method {method.name!r} needs a reward (reward: ... in the config)")
    late = {"denoiser": denoiser, "reward": reward, "guide": guide, "amortized": amortized}
    try:
        potential, proposal = (
            None if spec is None else spec.build(**late)
            for spec in (method.potential, method.proposal)
        )
    except ValueError as err:
        raise ValueError(f"method {method.name!r}: {err}") from err
    if method.kv_cache is not None:
        denoiser = _with_kv_cache(method, denoiser)
    return SMCSampler(
        denoiser,
        num_particles=method.num_particles,
        num_steps=method.num_steps,
        unmasking=method.unmasking,
        block_length=method.block_length,
        temperature=method.temperature,
        top_p=method.top_p,
        potential=potential,
        proposal=proposal,
        resampling=method.resampling,
        ess_threshold=method.ess_threshold,
        resample_when=method.resample_when,
        schedule=method.schedule,
        confidence_threshold=method.confidence_threshold,
        cache=method.cache,
        progress_bar=progress_bar,
        layout="sharded" if method.shard_particles and dist.is_initialized() else "local",
        stop_at_eos=method.stop_at_eos,
    )


def _with_kv_cache(method: Method, denoiser: Any) -> Any:
    """``denoiser`` wrapped in Fast-dLLM's KV cache (``kv_cache``), keeping its ``eos_id``."""
    from ..models.dllm import DiffusionLMDenoiser
    from ..models.dllm_cache import CachedDiffusionLM

    if isinstance(denoiser, CachedDiffusionLM):
        return denoiser
    if not isinstance(denoiser, DiffusionLMDenoiser):
        raise ValueError(
            f"method {method.name!r}: kv_cache: {method.kv_cache} caches the keys / values of a "
            f"diffusion LLM (LLaDA, Dream); {type(denoiser).__name__} is not one: set "
            "kv_cache: null"
        )
    cached = CachedDiffusionLM(denoiser, method.kv_cache, block_length=method.block_length)
    if getattr(denoiser, "eos_id", None) is not None:
        cached.eos_id = denoiser.eos_id
    return cached


def answers(out: SMCOutput, method: Method, reward: Any = None) -> Tensor:
    """One sequence per prompt ``[B, L]``: the highest-weight particle, for ``select: reward``
    the particle with the highest reward (best-of-N), for ``select: confidence`` the particle
    with the highest whole-trajectory log-confidence (``SMCOutput.best_confidence``)."""
    if method.select == "reward":
        return out.best(reward)
    if method.select == "confidence":
        return out.best_confidence()
    return out.best()


# ------------------------------------------------------------------------------ text prompts
@dataclass
class Completions:
    """What ``complete_prompts`` returns: one completion per prompt, and the cost.

    ``texts``: the decoded answers (after the prompt, cut at the first end token);
    ``prompt_tokens``: each prompt's length in tokens; ``nfe``: network evaluations per
    particle sequence, per prompt (the value of the batch it was sampled in, which can depend
    on its batch mates with ``stop_at_eos`` or the logit cache); ``steps``: the sampler steps
    of each prompt's batch; ``generated_tokens``: tokens of the answers up to their end token;
    ``seconds``: wall time of the sampler calls. Every list has one entry per prompt, so the
    ``Completions`` of contiguous shards of the prompts concatenate to those of the whole."""

    texts: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    nfe: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    generated_tokens: int = 0
    seconds: float = 0.0


def complete_prompts(
    method: Method,
    denoiser: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    gen_length: int,
    batch_size: int = 8,
    seed: int = 0,
    chat: bool = False,
    progress_bar: bool = False,
    first_index: int = 0,
) -> Completions:
    """Decode ``gen_length`` tokens after each of ``prompts`` with ``method`` on a diffusion LM.

    Prompts are encoded (``chat``: through the tokenizer's chat template) and left-padded in
    batches of ``batch_size`` (``models.dllm.prompt_batch``; the padding mask goes through
    ``cond``); prompt ``i`` is sampled with the generator seeded
    ``derive_seed(seed, first_index + i)``: ``first_index`` is the global index of the first
    prompt when ``prompts`` is a contiguous shard of a larger list (one rank's block under
    ``torchrun``), so an answer depends neither on the batching nor on the sharding -- with
    ``threshold`` / ``low_confidence`` unmasking. Rules that pick positions with uniforms
    (e.g. ``ancestral``, ``random``, ``maskgit``) draw them over the whole left-padded row, so
    there a prompt's answer also depends on the longest prompt of its batch (a valid draw, but
    not the same one). The
    answer (``answers``) is decoded from the tokens after the prompt up to the first of the
    denoiser's end tokens (``eos_id``), without special tokens."""
    from ..models.dllm import prompt_batch

    if first_index < 0:
        raise ValueError(
            f"first_index must be >= 0 (the global index of prompts[0]), got {first_index}"
        )
    if gen_length < 1:
        raise ValueError(f"gen_length must be >= 1, got {gen_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = build_sampler(method, denoiser, progress_bar=progress_bar)
    device = next(iter(denoiser.parameters())).device
    ends = getattr(denoiser, "eos_id", None)
    ends = () if ends is None else ((ends,) if isinstance(ends, int) else tuple(ends))
    result = Completions()
    for first in range(0, len(prompts), batch_size):
        chunk = list(prompts[first : first + batch_size])
        ids, mask = prompt_batch(tokenizer, chunk, chat=chat, mask_id=denoiser.mask_id)
        P = ids.shape[1]
        gens = [
            torch.Generator(device=device).manual_seed(derive_seed(seed, first_index + first + i))
            for i in range(len(chunk))
        ]
        start = time.perf_counter()
        out = sampler.sample(
            P + gen_length,
            prompt=ids.to(device),
            cond={"attention_mask": mask.to(device)},
            generator=gens,
        )
        best = answers(out, method)[:, P:].cpu()
        result.seconds += time.perf_counter() - start
        for row, real in zip(best.tolist(), mask.sum(1).tolist(), strict=True):
            cut = next((j for j, token in enumerate(row) if token in ends), len(row))
            result.texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            result.prompt_tokens.append(int(real))
            result.generated_tokens += cut
        result.nfe += [float(out.nfe)] * len(chunk)
        result.steps += [int(out.steps)] * len(chunk)
    return result
