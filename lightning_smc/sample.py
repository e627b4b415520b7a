"""``python -m lightning_smc.sample``: draw samples from a checkpoint with the shared sampler.

``python -m lightning_smc.sample`` loads a denoiser saved with ``save_pretrained`` (by default
the embedded Shakespeare MDLM in ``lightning_smc/assets/mdlm_tiny``) and its tokenizer, runs the
plain sampler (``--method plain``) or SR-SMC (``--method srsmc --particles N``) and prints the
decoded particles with their weights, the ESS trace and NFE.

``--toy`` runs the sampler on an *exact* denoiser over a toy language
(alphabet ``abc``, length 6, a fixed random joint ``p0``), so every number it prints can be
checked against the truth: the plain sampler draws from ``p0``; SR-SMC (``--method srsmc``)
targets ``p0^2``; reward tilting (``--method tilt``) targets ``p0 exp(r / alpha)`` with
``r`` = number of ``c``s. It prints the particles with their weights, the ESS after every step,
the resampling events and ``log Ẑ`` next to the exact ``log Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import ExactDenoiser, RewardTilt, SelfReward, SMCSampler, derive_seed
from .metrics import unigram_entropy
from .metrics.registry import DEFAULT_METRICS
from .models.loading import EMBEDDED, load_model

ALPHABET = "abc"
LENGTH = 6


def toy_denoiser(seed: int = 0) -> ExactDenoiser:
    g = torch.Generator().manual_seed(seed)
    p0 = torch.rand((len(ALPHABET),) * LENGTH, generator=g, dtype=torch.float64) ** 4 + 1e-3
    return ExactDenoiser(p0 / p0.sum())


def count_c(x: torch.Tensor) -> torch.Tensor:
    return (x == ALPHABET.index("c")).double().sum(-1)


def build(
    method: str, denoiser: ExactDenoiser, particles: int, steps: int, alpha: float
) -> tuple[SMCSampler, torch.Tensor]:
    """The sampler for ``method`` and the exact unnormalized target over all states."""
    log_p0 = torch.log(denoiser.probs[0])
    if method == "plain":
        return SMCSampler(
            denoiser, num_particles=particles, num_steps=steps, unmasking="random"
        ), log_p0
    if method == "srsmc":
        sampler = SMCSampler(
            denoiser,
            num_particles=particles,
            num_steps=steps,
            unmasking="random",
            potential=SelfReward(),
        )
        return sampler, 2 * log_p0
    if method == "tilt":
        potential = RewardTilt(count_c, alpha=alpha, schedule="linear")
        sampler = SMCSampler(
            denoiser,
            num_particles=particles,
            num_steps=steps,
            unmasking="random",
            potential=potential,
        )
        return sampler, log_p0 + count_c(denoiser.states) / alpha
    raise ValueError(f"--method {method!r}: choose plain, srsmc or tilt")


def decode(x: torch.Tensor) -> str:
    return "".join(ALPHABET[int(i)] for i in x)


def run_toy(args: argparse.Namespace, console: Console) -> None:
    denoiser = toy_denoiser()
    method = "srsmc" if args.method == "srsmc" else args.method
    sampler, log_target = build(
        method, denoiser, args.particles, min(args.steps, LENGTH), args.alpha
    )
    out = sampler.sample(LENGTH, batch_size=1, generator=torch.Generator().manual_seed(args.seed))
    target = torch.softmax(log_target, 0)
    table = Table(
        title=f"{method}: {args.particles} particles (exact denoiser, alphabet '{ALPHABET}')"
    )
    for col in ("particle", "text", "weight", "target prob"):
        table.add_column(col, justify="left" if col == "text" else "right")
    index = lambda x: int((x * (len(ALPHABET) ** torch.arange(LENGTH - 1, -1, -1))).sum())  # noqa: E731
    for i in out.log_weights[0].argsort(descending=True).tolist():
        x = out.tokens[0, i]
        table.add_row(str(i), decode(x), f"{out.weights[0, i]:.3f}", f"{target[index(x)]:.4f}")
    console.print(table)
    print_trace(console, out)
    exact = torch.logsumexp(log_target, 0).item()
    console.print(f"log Ẑ = {out.log_normalizer[0].item():.4f}   exact log Z = {exact:.4f}")
    best = out.best()[0]
    console.print(
        f"answer (highest weight): [bold]{decode(best)}[/bold] (target prob {target[index(best)]:.4f}); "
        f"the target's mode is {decode(denoiser.states[target.argmax()])} ({target.max():.4f})"
    )


def print_trace(console: Console, out) -> None:
    ess = " ".join(
        f"{e:.1f}" + ("*" if r else "")
        for e, r in zip(out.ess[0].tolist(), out.resampled[0].tolist(), strict=True)
    )
    console.print(f"ESS after each step (* = resampled): {ess}")
    console.print(f"NFE per sequence: {out.nfe:g}   resamples: {int(out.resampled.sum())}")


def run_checkpoint(args: argparse.Namespace, console: Console) -> None:
    try:
        denoiser, spec = load_model(Path(args.checkpoint))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--checkpoint: {err}") from err
    potential = SelfReward() if args.method == "srsmc" else None
    if args.method == "tilt":
        raise ValueError("--method tilt needs a reward; it is available with --toy only for now")
    sampler = SMCSampler(
        denoiser,
        num_particles=args.particles,
        num_steps=args.steps,
        unmasking=args.unmasking,
        potential=potential,
        cache=args.cache,
        progress_bar=True,
    )
    prompt = None
    if args.prompt:
        ids = spec.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([ids] * args.num_samples)
    generators = [
        torch.Generator().manual_seed(derive_seed(args.seed, i)) for i in range(args.num_samples)
    ]
    out = sampler.sample(
        args.seq_len, batch_size=args.num_samples, prompt=prompt, generator=generators
    )
    for b in range(args.num_samples):
        table = Table(
            title=f"sample {b}: {args.method}, {args.particles} particle(s), {args.steps} steps",
            show_lines=True,
        )
        table.add_column("weight", justify="right")
        table.add_column("text")
        for i in out.log_weights[b].argsort(descending=True).tolist():
            text = spec.tokenizer.decode(out.tokens[b, i].tolist(), skip_special_tokens=True)
            table.add_row(f"{out.weights[b, i]:.3f}", text)
        console.print(table)
    print_trace(console, out)


SAMPLE_METRICS = (*DEFAULT_METRICS[:3], "entropy", "dist", *DEFAULT_METRICS[3:])
"""The metrics of ``--config`` / ``--compare`` without ``--metrics`` (minus missing scorers)."""


def run_config(argv: list[str], console: Console) -> dict[str, dict[str, float]]:
    """``--config FILE [overrides]`` or ``--compare A.yaml B.yaml ... [overrides]``: method
    configs (``configs/methods``) on the same prompts and seeds. Writes ``samples.jsonl`` (one
    line per answer: method, index, text, tokens, final particle weights, reward, holdout,
    log Ẑ, unigram entropy) and ``summary.json`` into ``--out`` (default ``outputs/sample``) and
    prints one table.

    ``--nfe-budget B`` gives every method the steps that spend ``B`` network evaluations per
    answer (compute-matched comparison); ``--metrics a,b,...`` picks the summary's metrics by
    name (``lightning_smc.metrics.registry``; default ``SAMPLE_METRICS``); ``--gen-ppl`` adds
    ``gen_ppl``, scored by ``--gen-ppl-model`` (default ``smollm2``); ``--device cuda`` samples
    on the GPU (``cuda:LOCAL_RANK`` under torchrun).

    Under ``torchrun --nproc_per_node=K`` (``WORLD_SIZE > 1``) each rank samples its block of the
    prompts (a prompt's answer depends only on its index and the seed), the metrics are reduced
    across ranks, and rank zero alone writes the merged files, identical to a single process's.
    """
    from . import dist
    from .methods import evaluate_method, load_method_config, load_model, match_budget
    from .metrics import SMOLLM2
    from .metrics.registry import MetricSet, parse_metric_names, success_threshold_of

    argv, out_dir = _pop_option(argv, "--out", "outputs/sample")
    argv, gen_ppl = _pop_flag(argv, "--gen-ppl")
    argv, budget = _pop_option(argv, "--nfe-budget", "")
    argv, metric_names = _pop_option(argv, "--metrics", "")
    argv, ppl_model = _pop_option(argv, "--gen-ppl-model", SMOLLM2)
    argv, device = _pop_option(argv, "--device", "cpu")
    names = parse_metric_names(metric_names) if metric_names else None
    defaults = SAMPLE_METRICS
    if gen_ppl:  # --gen-ppl adds gen_ppl to --metrics, or to the defaults
        if names is None:
            defaults = (*SAMPLE_METRICS, "gen_ppl")
        elif "gen_ppl" not in names:
            names.append("gen_ppl")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose cpu or cuda")
    created = dist.init_from_env(device)
    if device == "cuda":
        device = f"cuda:{dist.local_rank()}"
    rank_zero = dist.is_rank_zero()
    configs, overrides = _split_configs(argv)
    runs = []  # parse every config and load every scorer before sampling anything
    for config, own in configs:
        run = load_method_config(config, own + overrides)  # the command line wins
        if budget:  # compute-matched: steps so that particles x steps x evaluations = budget
            run.method = match_budget(run.method, int(budget))
        threshold = success_threshold_of(run.reward) if run.reward is not None else None
        metrics = MetricSet(
            names,
            defaults=defaults,
            reward=run.reward is not None,
            holdout=run.holdout is not None,
            success_threshold=threshold,
            gen_ppl_model=ppl_model,
            device=device,
        )
        runs.append((config, run, metrics))
    summaries: dict[str, dict[str, float]] = {}
    lines: list[str] = []
    for config, run, metrics in runs:
        denoiser, tokenizer = load_model(run)
        for module in (denoiser, run.reward, run.holdout, run.guide):
            if isinstance(module, torch.nn.Module):
                module.to(device)
        summary, result = evaluate_method(run, metrics, denoiser, tokenizer, progress_bar=True)
        name = result.name if result.name not in summaries else f"{result.name} ({config})"
        summaries[name] = {
            "particles": run.method.num_particles,
            "steps": run.method.num_steps,
            **summary,
        }
        for i, text in enumerate(result.texts):
            record = {
                "method": name,
                "index": int(result.index[i]),
                "text": text,
                "tokens": result.tokens[i].tolist(),
                "weights": result.weights[i].tolist(),
                "log_normalizer": float(result.log_normalizer[i]),
                "entropy": unigram_entropy(result.tokens[i]),
            }
            for key in ("reward", "holdout"):
                values = getattr(result, key)
                if values is not None:
                    record[key] = float(values[i])
            lines.append(json.dumps(record))
        if rank_zero:
            for text in result.texts[:2]:
                console.print(f"[dim]{name}:[/dim] {text!r}")
    if rank_zero:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / "samples.jsonl", "\n".join(lines) + "\n")
        _write_atomic(out_dir / "summary.json", json.dumps(summaries, indent=2) + "\n")
        _print_summary(console, summaries, len(configs), out_dir, dist.world_size())
    if created:
        dist.destroy()
    return summaries


def _print_summary(
    console: Console, summaries: dict[str, dict[str, float]], runs: int, out_dir: Path, world: int
) -> None:
    from .metrics.registry import summary_table

    where = f"; {world} processes" if world > 1 else ""
    title = f"{runs} method(s){where}; samples in {out_dir / 'samples.jsonl'}"
    table = summary_table(title, summaries)
    console.print(table)


def _pop_option(argv: list[str], name: str, default: str) -> tuple[list[str], str]:
    rest, value, i = [], default, 0
    while i < len(argv):
        if argv[i] == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(name + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return rest, value


def _pop_flag(argv: list[str], name: str) -> tuple[list[str], bool]:
    return [a for a in argv if a != name], name in argv


def _split_configs(argv: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``--config F`` (one method config, or a comparison file) or ``--compare F1 F2 ...``:
    ``[(method config, its own overrides)]`` and the overrides common to all.

    A comparison file (``configs/eval/*.yaml``) lists ``runs:``, each ``{config: <path relative
    to the file>, overrides: [--key, value, ...]}``, plus optional common ``overrides:``."""
    if "--compare" in argv:
        i = argv.index("--compare")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        configs, rest = argv[i + 1 : j], argv[:i] + argv[j:]
        if not configs:
            raise ValueError("--compare needs one or more method config files")
        return [(c, []) for c in configs], rest
    rest, config = _pop_option(argv, "--config", "")
    if not config:
        raise ValueError("--config needs a method config file (configs/methods/...)")
    return _expand_comparison(Path(config)), rest


def _expand_comparison(path: Path) -> list[tuple[str, list[str]]]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "runs" not in data:
        return [(str(path), [])]
    common = [str(v) for v in data.get("overrides", [])]
    runs = []
    for k, entry in enumerate(data["runs"]):
        if not isinstance(entry, dict) or "config" not in entry:
            raise ValueError(f"{path}: runs[{k}] needs config: <method config path>")
        config = (path.parent / entry["config"]).resolve()
        if not config.is_file():
            raise FileNotFoundError(f"{path}: runs[{k}].config {entry['config']} does not exist")
        runs.append((str(config), common + [str(v) for v in entry.get("overrides", [])]))
    return runs


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]] | None:
    """The CLI; with ``--config`` / ``--compare`` returns the per-method summaries."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--config", "--compare") or a.startswith("--config=") for a in argv):
        return run_config(argv, Console())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        default=str(EMBEDDED),
        help="save_pretrained directory (default: embedded model)",
    )
    parser.add_argument(
        "--toy", action="store_true", help="exact toy denoiser instead of a checkpoint"
    )
    parser.add_argument("--method", default="srsmc", choices=["plain", "srsmc", "tilt"])
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=2, help="independent prompts / samples")
    parser.add_argument(
        "--unmasking",
        default="ancestral",
        choices=["ancestral", "random", "low_confidence", "threshold"],
    )
    parser.add_argument("--prompt", default=None, help="text prefix to continue")
    parser.add_argument("--cache", action="store_true", help="reuse logits of unchanged particles")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="reward temperature (--toy --method tilt)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("particles", "steps", "seq_len", "num_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    console = Console()
    if args.toy:
        run_toy(args, console)
    else:
        run_checkpoint(args, console)
    return None


if __name__ == "__main__":
    # under torchrun, a failing rank's error is written where the launcher reports it
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
