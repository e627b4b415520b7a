"""Named sampling methods: one ``Method`` = sampler settings + target + proposal + answer rule.

The papers' methods are presets of these fields (``configs/methods/*.yaml``):

============  ==========================================================================
best-of-N     ``potential: none``, ``N`` particles, ``select: reward`` (highest reward)
SMCbase       ``potential: tilt``, base proposal, resampling every k steps
SMCgrad       ``potential: tilt``, ``proposal: gradient`` (needs a differentiable reward)
SMCamot       ``potential: tilt``, ``proposal: amortized`` (a trained LoRA adapter)
Propgrad      SMCgrad with ``num_particles: 1``
Propamot      SMCamot with ``num_particles: 1``
SR-SMC        ``potential: self_reward``, resampling when ESS < N/2
============  ==========================================================================

``build_sampler(method, denoiser, reward=..., amortized=...)`` makes the shared ``SMCSampler``;
``answers(out, method, reward)`` picks one sequence per prompt (the highest-weight particle,
or the highest-reward one for best-of-N). Training rollouts, the evaluation callbacks and the
``sample`` CLI all build their samplers here.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import dist
from .models.loading import resolve_adapter
from .models.lora import LoRADenoiser
from .potentials import Potential, RewardTilt, SelfReward
from .proposals import DenoiserProposal, GradientProposal
from .rewards import BaseReward
from .sampler import SMCSampler
from .sampling.output import SMCOutput

__all__ = [
    "Method",
    "MethodRun",
    "answers",
    "build_sampler",
    "evaluate_method",
    "load_model",
    "load_method_config",
    "method_parser",
    "run_method",
    "MethodResult",
]

POTENTIALS = ("none", "self_reward", "tilt")
PROPOSALS = ("base", "gradient", "amortized")
SELECT = ("weight", "reward")


@dataclass
class Method:
    """A sampling method (see the module docstring for the presets).

    Args:
        name: label in logs and tables.
        num_particles, num_steps, unmasking, block_length, temperature, top_p, resampling,
            ess_threshold, resample_when, cache: as in ``SMCSampler``.
        potential: ``"none"``, ``"self_reward"`` (SR-SMC, scale ``beta``) or ``"tilt"``
            (``p0 exp(r / alpha)``, twist ``twist_schedule``, ``twist_samples`` x0 draws; 0 =
            greedy).
        proposal: ``"base"``, ``"gradient"`` (SMCgrad, Gumbel-softmax ``gradient_tau``) or
            ``"amortized"`` (SMCamot: the LoRA ``adapter`` folder, or the one passed in).
        select: ``"weight"`` (highest-weight particle) or ``"reward"`` (best-of-N).
        shard_particles: split each prompt's ``num_particles`` over the ranks of the default
            process group (``SMCSampler(layout="sharded")``, global resampling): for ``N`` too
            large for one device. Every rank then samples every prompt (instead of a shard of
            the prompts) and holds the same answers. In a single process (no process group)
            this is the local layout, which sharding over one rank equals bit for bit.
    """

    name: str = "smc"
    num_particles: int = 8
    num_steps: int = 64
    unmasking: str = "ancestral"
    block_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    potential: str = "none"
    beta: float = 1.0
    alpha: float = 0.1
    twist_schedule: str = "linear"
    twist_samples: int = 1
    proposal: str = "base"
    gradient_tau: float = 1.0
    adapter: str | None = None
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    resample_when: str | None = None
    select: str = "weight"
    cache: bool = False
    shard_particles: bool = False

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("potential", self.potential, POTENTIALS),
            ("proposal", self.proposal, PROPOSALS),
            ("select", self.select, SELECT),
        ):
            if value not in allowed:
                raise ValueError(
                    f"method {self.name!r}: {field}={value!r} is not one of {list(allowed)}"
                )
        if self.potential != "tilt" and self.proposal != "base":
            raise ValueError(
                f"method {self.name!r}: proposal={self.proposal!r} steers towards a reward; it "
                "needs potential: tilt"
            )

    @property
    def needs_reward(self) -> bool:
        return self.potential == "tilt" or self.select == "reward"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluations_per_step(method: Method) -> int:
    """Denoiser evaluations per particle per step: 1, plus 1 for a second network (the
    amortized proposal). The gradient proposal adds a reward backward pass, not a network call."""
    return 1 + (method.proposal == "amortized")


def match_budget(method: Method, nfe_budget: int) -> Method:
    """``method`` with the number of steps that spends ``nfe_budget`` network evaluations per
    answer (``num_particles * num_steps * evaluations_per_step``), so methods compare at equal
    compute: e.g. a budget of 256 gives the base sampler 256 steps, SR-SMC with N=4 64 steps
    and best-of-4 64 steps. A budget too small for one step per particle is an error."""
    import dataclasses

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
    amortized: LoRADenoiser | None = None,
    progress_bar: bool = False,
    guide: Any = None,
) -> SMCSampler:
    """The shared ``SMCSampler`` for ``method`` on ``denoiser`` (``p_theta``).

    ``amortized``: the LoRA proposal for ``proposal: amortized`` (else ``method.adapter`` is
    loaded onto a copy of ``denoiser``, which stays unadapted). ``guide``: a differentiable
    reward whose gradient drives ``proposal: gradient`` in place of the target's reward (a
    surrogate for a reward without gradients; the target and its weights do not change)."""
    if method.needs_reward and reward is None:
        raise ValueError(f"method {method.name!r} needs a reward (reward: ... in the config)")
    potential: Potential | None = None
    if method.potential == "self_reward":
        potential = SelfReward(method.beta)
    elif method.potential == "tilt":
        potential = RewardTilt(
            reward,
            alpha=method.alpha,
            schedule=method.twist_schedule,
            num_samples=method.twist_samples,
        )
    proposal = None
    if method.proposal == "gradient":
        proposal = GradientProposal(reward=guide, tau=method.gradient_tau)
    elif method.proposal == "amortized":
        if amortized is None:
            if method.adapter is None:
                raise ValueError(
                    f"method {method.name!r}: proposal: amortized needs adapter: <folder> "
                    "(written by AmortizedProposalModule)"
                )
            amortized = LoRADenoiser.from_adapter(
                copy.deepcopy(denoiser), resolve_adapter(method.adapter)
            )
        proposal = DenoiserProposal(amortized)
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
        cache=method.cache,
        progress_bar=progress_bar,
        layout="sharded" if method.shard_particles and dist.is_initialized() else "local",
    )


def answers(out: SMCOutput, method: Method, reward: Any = None) -> Tensor:
    """One sequence per prompt ``[B, L]``: the highest-weight particle, or for
    ``select: reward`` the particle with the highest reward (best-of-N)."""
    if method.select == "reward":
        return out.best(reward)
    return out.best()


# ---------------------------------------------------------------------------- config files
@dataclass
class MethodRun:
    """A method config file (``configs/methods/**.yaml``), parsed and instantiated.

    Keys: ``method`` (the ``Method`` fields), ``model`` (checkpoint folder, ``embedded`` or a hub
    id in the mdlm-owt format), ``reward`` and ``holdout`` (``class_path`` / ``init_args``; the
    holdout is a *different* scorer, reported, never steered on), ``seq_len``,
    ``num_samples`` (prompts), ``batch_size`` (prompts per sampler call) and ``seed``."""

    method: Method
    model: str
    reward: Any
    holdout: Any
    guide: Any
    tokenizer: str | None
    prompts: str | None
    seq_len: int
    num_samples: int
    batch_size: int
    seed: int


def method_parser():
    """The jsonargparse parser of method config files (``--config FILE`` plus overrides)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning_smc.sample", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a method YAML file")
    parser.add_class_arguments(Method, "method")
    parser.add_argument("--model", type=str, default="embedded")
    parser.add_argument("--reward", type=BaseReward | None, default=None)
    parser.add_argument("--holdout", type=BaseReward | None, default=None)
    parser.add_argument("--guide", type=BaseReward | None, default=None)
    parser.add_argument("--tokenizer", type=str | None, default=None)
    parser.add_argument("--prompts", type=str | None, default=None)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_method_config(path: str | Path | None = None, overrides: list[str] = ()) -> MethodRun:
    """Parse ``path`` (plus command-line style ``overrides``) into a ``MethodRun``."""
    parser = method_parser()
    args = (["--config", str(path)] if path is not None else []) + list(overrides)
    try:
        config = parser.instantiate_classes(parser.parse_args(args))
    except Exception as err:  # jsonargparse reports the offending key; keep its message
        raise ValueError(f"method config {path}: {err}") from err
    for key in ("seq_len", "num_samples", "batch_size"):
        if config[key] < 1:
            raise ValueError(f"method config {path}: {key} must be >= 1, got {config[key]}")
    for key in ("reward", "holdout", "guide"):
        if isinstance(config[key], dict):
            raise ValueError(
                f"method config {path}: {key} must be class_path/init_args of a reward, got {config[key]}"
            )
    return MethodRun(**{field: config[field] for field in MethodRun.__dataclass_fields__})


@dataclass
class MethodResult:
    """What ``run_method`` returns: one answer per prompt, its scores and its diagnostics.

    Per answer (``S`` prompts, ``N`` particles, ``T`` steps): ``index [S]`` the global prompt
    indices (``range(num_samples)``, or this process's shard of it); ``tokens [S, L]``;
    ``texts`` (decoded); ``reward`` / ``holdout [S]`` float64 (``None`` without that scorer);
    ``log_normalizer [S]`` (``log Ẑ``); ``log_weights [S, N]`` the final normalized particle
    log-weights; ``ess_trace [S, T]`` the ESS after each step and ``resampled [S, T]`` whether
    a resample followed; ``overtakes [S]``; ``sample_nfe [S]`` network evaluations per particle
    sequence; ``sample_seconds [S]`` sampling wall time (of its batch, shared equally).

    ``ess`` (mean ESS / N), ``nfe`` and ``seconds`` are the means over answers;
    ``summary(...)`` computes the named metrics (``metrics.registry``); ``merge(parts)`` joins
    the shards of several processes in prompt order."""

    name: str
    index: Tensor
    tokens: Tensor
    texts: list[str]
    reward: Tensor | None
    holdout: Tensor | None
    log_normalizer: Tensor
    log_weights: Tensor
    ess_trace: Tensor
    resampled: Tensor
    overtakes: Tensor
    sample_nfe: Tensor
    sample_seconds: Tensor
    num_particles: int

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def ess(self) -> float:
        """Mean over answers and steps of ESS / N."""
        return float((self.ess_trace.double().mean(-1) / self.num_particles).mean())

    @property
    def nfe(self) -> float:
        """Mean network evaluations per particle sequence."""
        return float(self.sample_nfe.double().mean())

    @property
    def seconds(self) -> float:
        """Mean sampling wall time per answer."""
        return float(self.sample_seconds.double().mean())

    @property
    def weights(self) -> Tensor:
        """Final normalized particle weights ``[S, N]``."""
        return self.log_weights.exp()

    def summary(
        self,
        success_threshold: float | None = None,
        metrics: str | list[str] | None = None,
        gen_ppl_model: str = "smollm2",
    ) -> dict[str, float]:
        """The named metrics of these answers in this process (``metrics.MetricSet``;
        ``None``: the defaults). ``success`` is ``reward > success_threshold``."""
        from .metrics.registry import MetricSet

        metric_set = MetricSet(
            metrics,
            reward=self.reward is not None,
            holdout=self.holdout is not None,
            success_threshold=success_threshold,
            gen_ppl_model=gen_ppl_model,
            sync=False,
        )
        metric_set.update(self)
        return metric_set.compute()

    def cpu(self) -> MethodResult:
        """A copy with every tensor on the CPU (to pickle or gather)."""
        moved = {
            k: (v.cpu() if isinstance(v, Tensor) else v)
            for k, v in ((f, getattr(self, f)) for f in self.__dataclass_fields__)
        }
        return MethodResult(**moved)

    def select(self, rows: list[int]) -> MethodResult:
        """The answers at positions ``rows`` (e.g. ``[]``: none, with every field's shape)."""
        at = torch.tensor(rows, dtype=torch.long)

        def pick(value):
            if isinstance(value, Tensor):
                return value[at.to(value.device)]
            if isinstance(value, list):
                return [value[i] for i in rows]
            return value

        return MethodResult(**{f: pick(getattr(self, f)) for f in self.__dataclass_fields__})

    @classmethod
    def merge(cls, parts: list[MethodResult]) -> MethodResult:
        """The answers of ``parts`` (shards of one method's prompts) in prompt order. A prompt in
        two parts is an error."""
        if not parts:
            raise ValueError("MethodResult.merge needs at least one part")
        names = {p.name for p in parts}
        if len(names) != 1:
            raise ValueError(f"MethodResult.merge: parts of different methods {sorted(names)}")
        filled = [p for p in parts if len(p)] or parts[:1]
        index = torch.cat([p.index for p in filled])
        order = torch.argsort(index, stable=True)
        if (index[order][1:] == index[order][:-1]).any():
            raise ValueError("MethodResult.merge: a prompt index appears in more than one part")

        def join(field: str):
            values = [getattr(p, field) for p in filled]
            if values[0] is None:
                if any(v is not None for v in values):
                    raise ValueError(f"MethodResult.merge: {field} is missing in some parts")
                return None
            if isinstance(values[0], list):
                flat = [item for v in values for item in v]
                return [flat[i] for i in order.tolist()]
            return torch.cat(values)[order]

        return cls(
            **{f: join(f) for f in cls.__dataclass_fields__ if f not in ("name", "num_particles")},
            name=parts[0].name,
            num_particles=parts[0].num_particles,
        )


def run_method(
    run: MethodRun,
    denoiser: Any = None,
    tokenizer: Any = None,
    progress_bar: bool = False,
    amortized: LoRADenoiser | None = None,
    shard: tuple[int, int] | None = None,
) -> MethodResult:
    """Sample ``run.num_samples`` answers with ``run.method`` (prompt ``i`` seeded by
    ``derive_seed(run.seed, i)``, so answers do not depend on ``batch_size`` or sharding) and
    score them.

    ``denoiser`` / ``tokenizer``: use these instead of loading ``run.model``; ``amortized``:
    the LoRA proposal for ``proposal: amortized`` (see ``build_sampler``); ``shard = (rank,
    world_size)``: only the prompts ``dist.shard_indices(num_samples, world_size, rank)``
    (contiguous blocks), by their global indices."""
    import time

    from .dist import shard_indices
    from .rewards import check_reward_output
    from .smc import derive_seed

    if denoiser is None:
        denoiser, tokenizer = load_model(run, tokenizer)
    for scorer in (run.reward, run.holdout):
        unbound = hasattr(scorer, "bind_tokenizer") and getattr(scorer, "spec", 0) is None
        if unbound and tokenizer is not None:
            scorer.bind_tokenizer(tokenizer)
    sampler = build_sampler(
        run.method,
        denoiser,
        run.reward,
        amortized=amortized,
        progress_bar=progress_bar,
        guide=run.guide,
    )
    device = next(iter(denoiser.parameters())).device if hasattr(denoiser, "parameters") else None
    prompts = read_prompts(run.prompts, tokenizer, run.seq_len) if run.prompts else None
    num_samples = len(prompts) if prompts is not None else run.num_samples
    indices = (
        list(range(num_samples))
        if shard is None
        else shard_indices(num_samples, shard[1], shard[0])
    )
    N, T = run.method.num_particles, run.method.num_steps
    tokens, log_z, log_w, nfe, seconds, traces, resampled, overtakes = (
        [torch.empty(0, run.seq_len, dtype=torch.long)],
        [torch.empty(0, dtype=torch.float64)],
        [torch.empty(0, N, dtype=torch.float64)],
        [torch.empty(0, dtype=torch.float64)],
        [torch.empty(0, dtype=torch.float64)],
        [torch.empty(0, T, dtype=torch.float64)],
        [torch.empty(0, T, dtype=torch.bool)],
        [torch.empty(0, dtype=torch.long)],
    )
    for ids in _batches(prompts, indices, run.batch_size):
        start = time.perf_counter()
        generators = [
            torch.Generator(device=device or "cpu").manual_seed(derive_seed(run.seed, i))
            for i in ids
        ]
        prompt = None
        if prompts is not None and prompts[ids[0]]:
            prompt = torch.tensor([prompts[i] for i in ids], dtype=torch.long)
        out = sampler.sample(run.seq_len, prompt=prompt, generator=generators, device=device)
        tokens.append(answers(out, run.method, run.reward).cpu())
        log_z.append(out.log_normalizer.cpu())
        log_w.append(out.log_weights.cpu())
        traces.append(out.ess.cpu())
        resampled.append(out.resampled.cpu())
        overtakes.append(out.overtakes.cpu())
        nfe.append(torch.full((len(ids),), float(out.nfe), dtype=torch.float64))
        elapsed = time.perf_counter() - start
        seconds.append(torch.full((len(ids),), elapsed / len(ids), dtype=torch.float64))
    x = torch.cat(tokens)

    def score(scorer):
        if scorer is None:
            return None
        if x.shape[0] == 0:  # an empty shard: nothing to score
            return torch.empty(0, dtype=torch.float64)
        return check_reward_output(scorer, scorer(x.to(device or "cpu")), x.shape[0]).cpu()

    texts = (
        [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in x]
        if tokenizer is not None
        else [" ".join(map(str, row.tolist())) for row in x]
    )
    return MethodResult(
        name=run.method.name,
        index=torch.tensor(indices, dtype=torch.long),
        tokens=x,
        texts=texts,
        reward=score(run.reward),
        holdout=score(run.holdout),
        log_normalizer=torch.cat(log_z),
        log_weights=torch.cat(log_w),
        ess_trace=torch.cat(traces),
        resampled=torch.cat(resampled),
        overtakes=torch.cat(overtakes),
        sample_nfe=torch.cat(nfe),
        sample_seconds=torch.cat(seconds),
        num_particles=N,
    )


def evaluate_method(
    run: MethodRun,
    metrics: Any,
    denoiser: Any = None,
    tokenizer: Any = None,
    progress_bar: bool = False,
    amortized: LoRADenoiser | None = None,
) -> tuple[dict[str, float], MethodResult]:
    """Evaluate ``run`` over every process of the default group (or in this one alone).

    This process samples its shard of the prompts (``run_method(..., shard=(rank,
    world_size))``; a prompt's answer depends only on its global index), or with
    ``method.shard_particles`` its share of every prompt's particles, adds it to
    ``metrics`` (a ``metrics.MetricSet``, reset first) and reduces the metrics across
    processes. Returns ``(summary, every process's answers merged in prompt order)``, the same
    on every rank and equal to a single process's. Every rank must call it, in the same order;
    ``progress_bar`` shows on rank zero only."""
    from . import dist

    rank, world = dist.rank(), dist.world_size()
    particles = run.method.shard_particles  # every rank samples every prompt, N / world each
    local = run_method(
        run,
        denoiser,
        tokenizer,
        progress_bar=progress_bar and rank == 0,
        amortized=amortized,
        shard=None if particles else (rank, world),
    )
    metrics.reset()
    # sharded particles: every rank holds the same answers, counted once (rank zero's)
    metrics.update(local if rank == 0 or not particles else local.select([]))
    summary = metrics.compute()
    merged = local.cpu() if particles else MethodResult.merge(dist.all_gather_object(local.cpu()))
    if len(merged) and not torch.equal(merged.index, torch.arange(len(merged))):
        raise RuntimeError(
            f"evaluate_method: the shards of {world} process(es) cover prompts "
            f"{merged.index.tolist()}, not 0..{len(merged) - 1}"
        )
    return summary, merged


def read_prompts(path: str | Path, tokenizer: Any, seq_len: int) -> list[list[int]]:
    """Token ids of each line of the prompt file ``path`` (blank lines are prompts too: an
    empty prefix). Errors name the file and line: missing file, no lines, a prompt that leaves
    nothing to generate within ``seq_len``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {path} is not a file")
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"prompts: {path} is empty; write one prompt per line")
    if tokenizer is None:
        raise ValueError("prompts need a tokenizer to encode them (tokenizer: ...)")
    encoded = []
    for number, line in enumerate(lines, 1):
        ids = tokenizer.encode(line, add_special_tokens=False) if line else []
        if len(ids) >= seq_len:
            raise ValueError(
                f"prompts: {path} line {number} is {len(ids)} tokens, which leaves nothing to "
                f"generate with seq_len={seq_len}; shorten it or raise seq_len"
            )
        encoded.append(ids)
    return encoded


def _batches(prompts: list[list[int]] | None, indices: list[int], batch_size: int):
    """Runs of at most ``batch_size`` consecutive entries of ``indices`` whose prompts have
    equal length (the sampler fixes the first ``P`` tokens of a batch)."""
    first = 0
    while first < len(indices):
        last = min(first + batch_size, len(indices))
        if prompts is not None:
            width = len(prompts[indices[first]])
            last = next((j for j in range(first, last) if len(prompts[indices[j]]) != width), last)
        yield indices[first:last]
        first = last


def load_model(run: MethodRun, tokenizer: Any = None):
    """The denoiser and tokenizer of ``run`` (``models.loading.load_model``)."""
    from .models.loading import load_model as load

    denoiser, spec = load(run.model, run.tokenizer)
    return denoiser, spec.tokenizer if tokenizer is None else tokenizer
