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

from torch import Tensor

from .models.lora import LoRADenoiser
from .output import SMCOutput
from .potentials import Potential, RewardTilt, SelfReward
from .pretrained import resolve_adapter
from .proposals import DenoiserProposal, GradientProposal
from .rewards import BaseReward
from .sampler import SMCSampler

__all__ = [
    "Method",
    "MethodRun",
    "answers",
    "build_sampler",
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
    """What ``run_method`` returns: one answer per prompt and its scores.

    ``tokens [S, L]``, ``texts`` (decoded), ``reward`` / ``holdout [S]`` float64 (``None`` without
    that scorer), ``log_normalizer [S]``, ``ess`` (mean ESS fraction), ``nfe`` per particle
    sequence, ``seconds`` per prompt (wall time of sampling), and per prompt the ESS after
    each step ``ess_trace [S, T]`` and whether a resample followed ``resampled [S, T]``."""

    name: str
    tokens: Tensor
    texts: list[str]
    reward: Tensor | None
    holdout: Tensor | None
    log_normalizer: Tensor
    ess: float
    nfe: float
    seconds: float
    ess_trace: Tensor
    resampled: Tensor

    def summary(self, success_threshold: float | None = None) -> dict[str, float]:
        row = {"ess": self.ess, "nfe": self.nfe, "seconds": self.seconds}
        if self.reward is not None:
            row["reward"] = float(self.reward.mean())
            if success_threshold is not None:
                row["success"] = float((self.reward > success_threshold).double().mean())
        if self.holdout is not None:
            row["holdout"] = float(self.holdout.mean())
        return row


def run_method(
    run: MethodRun,
    denoiser: Any = None,
    tokenizer: Any = None,
    progress_bar: bool = False,
    amortized: LoRADenoiser | None = None,
) -> MethodResult:
    """Sample ``run.num_samples`` answers with ``run.method`` (prompt ``i`` seeded by
    ``derive_seed(run.seed, i)``, so answers do not depend on ``batch_size``) and score them.

    ``denoiser`` / ``tokenizer``: use these instead of loading ``run.model``; ``amortized``:
    the LoRA proposal for ``proposal: amortized`` (see ``build_sampler``)."""
    import time

    import torch

    from .rewards import check_reward_output
    from .smc import derive_seed

    if denoiser is None:
        denoiser, tokenizer = _load_model(run, tokenizer)
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
    tokens, log_z, ess, nfe, traces, resampled = [], [], [], [], [], []
    start = time.perf_counter()
    for ids in _batches(prompts, num_samples, run.batch_size):
        generators = [
            torch.Generator(device=device or "cpu").manual_seed(derive_seed(run.seed, i))
            for i in ids
        ]
        prompt = None
        if prompts is not None and prompts[ids[0]]:
            prompt = torch.tensor([prompts[i] for i in ids], dtype=torch.long)
        out = sampler.sample(run.seq_len, prompt=prompt, generator=generators, device=device)
        tokens.append(answers(out, run.method, run.reward))
        log_z.append(out.log_normalizer)
        ess.append(out.ess.mean(-1) / run.method.num_particles)
        traces.append(out.ess)
        resampled.append(out.resampled)
        nfe.append(out.nfe * len(ids))
    seconds = (time.perf_counter() - start) / num_samples
    x = torch.cat(tokens)

    def score(scorer):
        return None if scorer is None else check_reward_output(scorer, scorer(x), x.shape[0])

    texts = (
        [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in x]
        if tokenizer is not None
        else [" ".join(map(str, row.tolist())) for row in x]
    )
    return MethodResult(
        run.method.name,
        x,
        texts,
        score(run.reward),
        score(run.holdout),
        torch.cat(log_z),
        float(torch.cat(ess).mean()),
        sum(nfe) / num_samples,
        seconds,
        torch.cat(traces),
        torch.cat(resampled),
    )


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


def _batches(prompts: list[list[int]] | None, num_samples: int, batch_size: int):
    """Index ranges of at most ``batch_size`` consecutive samples whose prompts have equal
    length (the sampler fixes the first ``P`` tokens of a batch)."""
    first = 0
    while first < num_samples:
        last = min(first + batch_size, num_samples)
        if prompts is not None:
            width = len(prompts[first])
            last = next((i for i in range(first, last) if len(prompts[i]) != width), last)
        yield range(first, last)
        first = last


def _load_model(run: MethodRun, tokenizer: Any):
    """The denoiser and tokenizer of ``run``: a local folder with its tokenizer, or a hub id
    in the mdlm-owt format with ``run.tokenizer`` (e.g. ``gpt2``)."""
    from .data.tokenizer import load_tokenizer
    from .models.mdlm import MDLMDenoiser
    from .pretrained import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(run.model)
    if run.tokenizer is None and path.is_dir():
        denoiser, spec = load_checkpoint(path)
    else:
        if run.tokenizer is None:
            raise ValueError(
                f"model {run.model!r} is not a local folder; name its tokenizer (tokenizer: gpt2)"
            )
        denoiser = MDLMDenoiser.from_pretrained(path).eval()
        spec = load_tokenizer(run.tokenizer)
    return denoiser, spec.tokenizer if tokenizer is None else tokenizer
