"""``python -m lightning_smc.sample``: a console demo of the shared sampler.

Until the embedded text model lands, the demo runs on an *exact* denoiser over a toy language
(alphabet ``abc``, length 6, a fixed random joint ``p0``), so every number it prints can be
checked against the truth: the plain sampler draws from ``p0``; SR-SMC (``--method srsmc``)
targets ``p0^2``; reward tilting (``--method tilt``) targets ``p0 exp(r / alpha)`` with
``r`` = number of ``c``s. It prints the particles with their weights, the ESS after every step,
the resampling events and ``log Ẑ`` next to the exact ``log Z``.
"""

from __future__ import annotations

import argparse
import math

import torch
from rich.console import Console
from rich.table import Table

from . import ExactDenoiser, RewardTilt, SelfReward, SMCSampler

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="srsmc", choices=["plain", "srsmc", "tilt"])
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument(
        "--steps",
        type=int,
        default=LENGTH,
        help=f"reverse steps (<= {LENGTH} commits one token each)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="reward temperature for --method tilt"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    console = Console()
    denoiser = toy_denoiser()
    sampler, log_target = build(args.method, denoiser, args.particles, args.steps, args.alpha)
    out = sampler.sample(LENGTH, batch_size=1, generator=torch.Generator().manual_seed(args.seed))

    target = torch.softmax(log_target, 0)
    table = Table(
        title=f"{args.method}: {args.particles} particles, {args.steps} steps (exact denoiser, alphabet '{ALPHABET}')"
    )
    for col in ("particle", "text", "weight", "target prob"):
        table.add_column(col, justify="right" if col != "text" else "left")
    index = lambda x: int((x * (len(ALPHABET) ** torch.arange(LENGTH - 1, -1, -1))).sum())  # noqa: E731
    for i in out.log_weights[0].argsort(descending=True).tolist():
        x = out.tokens[0, i]
        table.add_row(str(i), decode(x), f"{out.weights[0, i]:.3f}", f"{target[index(x)]:.4f}")
    console.print(table)
    ess = " ".join(
        f"{e:.1f}" + ("*" if r else "")
        for e, r in zip(out.ess[0].tolist(), out.resampled[0].tolist(), strict=True)
    )
    console.print(f"ESS after each step (* = resampled): {ess}")
    exact = torch.logsumexp(log_target, 0).item()
    console.print(
        f"log Ẑ = {out.log_normalizer[0].item():.4f}   exact log Z = {exact:.4f}   NFE = {out.nfe}"
    )
    console.print(
        f"answer (highest weight): [bold]{decode(out.best()[0])}[/bold]   "
        f"its target prob {target[index(out.best()[0])]:.4f}, most likely under the target: "
        f"{decode(denoiser.states[target.argmax()])} ({target.max():.4f}); uniform would be {1 / math.prod([len(ALPHABET)] * LENGTH):.4f}"
    )


if __name__ == "__main__":
    main()
