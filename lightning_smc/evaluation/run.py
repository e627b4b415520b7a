"""Running a method over prompts: ``run_method`` (one process, or one shard of the prompts) and
``evaluate_method`` (every process of the default group, metrics reduced across them).

Notation: ``S`` prompts (or unconditional answers), ``N`` particles, ``L = seq_len``. Prompt
``i`` is sampled with the generator seeded by ``derive_seed(seed, i)``, so an answer depends
only on its global index: not on ``batch_size``, the batch it lands in, or the process that
samples it. Batches are runs of consecutive prompts of equal length (the sampler fixes the
first ``P`` tokens of a batch); each batch's answers are one ``MethodResult``, and the batches
are joined with ``MethodResult.merge`` before the scorers run over all answers at once.

``run_method`` and ``evaluate_distributed`` take objects (a ``Method``, a denoiser, a tokenizer,
rewards, encoded prompts); ``run_config`` and ``evaluate_method`` take a parsed method config
file (``methods.MethodConfig``), load its model (``models.loading.load_model``) and read its
prompt file. Example::

    method = Method(name="SR-SMC", num_particles=4, num_steps=32, potential="self_reward")
    result = run_method(method, denoiser, tokenizer, num_samples=8, seq_len=32, reward=vader)
    result.reward.mean(), result.ess
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..methods import Method, MethodConfig, answers, build_sampler
from ..rewards import check_reward_output
from ..smc import derive_seed
from .result import MethodResult

__all__ = [
    "evaluate_distributed",
    "evaluate_method",
    "read_prompts",
    "run_config",
    "run_method",
]


def run_method(
    method: Method,
    denoiser: Any,
    tokenizer: Any = None,
    *,
    prompts: list[list[int]] | None = None,
    num_samples: int = 16,
    reward: Any = None,
    holdout: Any = None,
    guide: Any = None,
    seq_len: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    amortized: Any = None,
    progress_bar: bool = False,
    shard: tuple[int, int] | None = None,
) -> MethodResult:
    """Sample one answer per prompt with ``method`` on ``denoiser`` and score it.

    ``prompts``: token ids per prompt (``read_prompts``; ``[]``: an empty prefix), else
    ``num_samples`` unconditional answers. ``reward`` is the target's (bound into the
    potential; also the ``select: reward`` score), ``holdout`` a different scorer, reported
    only; ``guide``, ``amortized``: see ``build_sampler``. ``tokenizer`` decodes the answers
    (and is bound into scorers that have none). ``shard = (rank, world_size)``: only the prompts
    ``dist.shard_indices(S, world_size, rank)`` (contiguous blocks), by their global indices."""
    for scorer in (reward, holdout):
        unbound = hasattr(scorer, "bind_tokenizer") and getattr(scorer, "spec", 0) is None
        if unbound and tokenizer is not None:
            scorer.bind_tokenizer(tokenizer)
    sampler = build_sampler(
        method, denoiser, reward, amortized=amortized, progress_bar=progress_bar, guide=guide
    )
    device = next(iter(denoiser.parameters())).device if hasattr(denoiser, "parameters") else None
    total = len(prompts) if prompts is not None else num_samples
    indices = list(range(total)) if shard is None else dist.shard_indices(total, shard[1], shard[0])
    parts = [MethodResult.empty(method.name, method.num_particles, method.num_steps, seq_len)]
    for ids in _batches(prompts, indices, batch_size):
        start = time.perf_counter()
        generators = [
            torch.Generator(device=device or "cpu").manual_seed(derive_seed(seed, i)) for i in ids
        ]
        prompt = None
        if prompts is not None and prompts[ids[0]]:
            prompt = torch.tensor([prompts[i] for i in ids], dtype=torch.long)
        out = sampler.sample(seq_len, prompt=prompt, generator=generators, device=device)
        tokens = answers(out, method, reward).cpu()
        seconds = (time.perf_counter() - start) / len(ids)
        parts.append(
            MethodResult(
                name=method.name,
                index=torch.tensor(ids, dtype=torch.long),
                tokens=tokens,
                texts=_decode(tokens, tokenizer),
                reward=None,
                holdout=None,
                log_normalizer=out.log_normalizer.cpu(),
                log_weights=out.log_weights.cpu(),
                ess_trace=out.ess.cpu(),
                resampled=out.resampled.cpu(),
                overtakes=out.overtakes.cpu(),
                sample_nfe=torch.full((len(ids),), float(out.nfe), dtype=torch.float64),
                sample_seconds=torch.full((len(ids),), seconds, dtype=torch.float64),
                num_particles=method.num_particles,
            )
        )
    result = MethodResult.merge(parts)
    result.reward = _score(reward, result.tokens, device)
    result.holdout = _score(holdout, result.tokens, device)
    return result


def evaluate_distributed(
    method: Method, metrics: Any, denoiser: Any, tokenizer: Any = None, **job: Any
) -> tuple[dict[str, float], MethodResult]:
    """Evaluate ``method`` over every process of the default group (or in this one alone).

    This process samples its shard of the prompts (``run_method(..., shard=(rank,
    world_size))``, ``job`` its other arguments), or with ``method.shard_particles`` its share
    of every prompt's particles, adds it to ``metrics`` (a ``metrics.MetricSet``, reset first)
    and reduces the metrics across processes. Returns ``(summary, every process's answers
    merged in prompt order)``, the same on every rank and equal to a single process's. Every
    rank must call it, in the same order; ``progress_bar`` shows on rank zero only."""
    rank, world = dist.rank(), dist.world_size()
    particles = method.shard_particles  # every rank samples every prompt, N / world each
    job["progress_bar"] = job.get("progress_bar", False) and rank == 0
    local = run_method(
        method, denoiser, tokenizer, shard=None if particles else (rank, world), **job
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


def run_config(
    config: MethodConfig,
    denoiser: Any = None,
    tokenizer: Any = None,
    progress_bar: bool = False,
    amortized: Any = None,
    shard: tuple[int, int] | None = None,
) -> MethodResult:
    """``run_method`` of a method config file: its model (unless ``denoiser`` / ``tokenizer``
    are given), prompts, scorers and sizes."""
    denoiser, tokenizer, job = _config_job(config, denoiser, tokenizer)
    return run_method(
        config.method, denoiser, tokenizer, progress_bar=progress_bar, amortized=amortized,
        shard=shard, **job,
    )  # fmt: skip


def evaluate_method(
    run: MethodConfig,
    metrics: Any,
    denoiser: Any = None,
    tokenizer: Any = None,
    progress_bar: bool = False,
    amortized: Any = None,
) -> tuple[dict[str, float], MethodResult]:
    """``evaluate_distributed`` of a method config file (see ``run_config``)."""
    denoiser, tokenizer, job = _config_job(run, denoiser, tokenizer)
    return evaluate_distributed(
        run.method, metrics, denoiser, tokenizer, progress_bar=progress_bar,
        amortized=amortized, **job,
    )  # fmt: skip


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


def _config_job(config: MethodConfig, denoiser: Any, tokenizer: Any):
    """``(denoiser, tokenizer, run_method keyword arguments)`` of ``config``."""
    if denoiser is None:
        from ..models.loading import load_model

        denoiser, spec = load_model(config.model, config.tokenizer)
        tokenizer = spec.tokenizer if tokenizer is None else tokenizer
    prompts = read_prompts(config.prompts, tokenizer, config.seq_len) if config.prompts else None
    job = {
        "prompts": prompts,
        "num_samples": config.num_samples,
        "reward": config.reward,
        "holdout": config.holdout,
        "guide": config.guide,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }
    return denoiser, tokenizer, job


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


def _decode(tokens: torch.Tensor, tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [" ".join(map(str, row.tolist())) for row in tokens]
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]


def _score(scorer: Any, tokens: torch.Tensor, device: Any) -> torch.Tensor | None:
    if scorer is None:
        return None
    if tokens.shape[0] == 0:  # an empty shard: nothing to score
        return torch.empty(0, dtype=torch.float64)
    out = scorer(tokens.to(device or "cpu"))
    return check_reward_output(scorer, out, tokens.shape[0]).cpu()
