"""The exact toy demo: the shared sampler on an *exact* denoiser, every number checkable.

The toy language has alphabet ``abc`` and length 6 with a fixed random joint ``p0``; its
``ExactDenoiser`` returns the true conditionals, and the sampler unmasks one random position
per step (``random`` unmasking). The plain sampler (``--method plain``) draws from ``p0``;
SR-SMC (``--method srsmc``) targets ``p0^2``; reward tilting (``--method tilt``) targets
``p0 exp(r / alpha)`` with ``r`` = number of ``c``s. It prints the particles with their weights
and target probabilities, the ESS after every step, the resampling events and ``log Ẑ`` next to
the exact ``log Z``::

    python experiments/toy_sample.py --method tilt --num_particles 8 --alpha 0.5

The options are the arguments of ``main`` (a jsonargparse CLI; ``--help`` lists them); any other
flag is refused by name. Sequence length and the model are fixed by the toy.
"""

from __future__ import annotations

from typing import Literal

import torch
from jsonargparse import auto_cli
from jsonargparse.typing import PositiveInt
from rich.console import Console
from rich.table import Table

from lightning_smc import ExactDenoiser, RewardTilt, SelfReward, SMCSampler

ALPHABET = "abc"
LENGTH = 6


def toy_denoiser(seed: int = 0) -> ExactDenoiser:
    """The exact denoiser of a fixed random joint ``p0`` over ``abc``^6."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.rand((len(ALPHABET),) * LENGTH, generator=g, dtype=torch.float64) ** 4 + 1e-3
    return ExactDenoiser(p0 / p0.sum())


def count_c(x: torch.Tensor) -> torch.Tensor:
    """The toy reward: the number of ``c``s."""
    return (x == ALPHABET.index("c")).double().sum(-1)


def build(method: str, denoiser: ExactDenoiser, num_particles: int, num_steps: int, alpha: float):
    """The sampler for ``method`` and the exact unnormalized log-target over all states."""
    log_p0 = torch.log(denoiser.probs[0])
    potential, log_target = {
        "plain": (None, log_p0),
        "srsmc": (SelfReward(), 2 * log_p0),
        "tilt": (
            RewardTilt(count_c, alpha=alpha, schedule="linear"),
            log_p0 + count_c(denoiser.states) / alpha,
        ),
    }[method]
    sampler = SMCSampler(
        denoiser,
        num_particles=num_particles,
        num_steps=num_steps,
        unmasking="random",
        potential=potential,
    )
    return sampler, log_target


def decode(x: torch.Tensor) -> str:
    return "".join(ALPHABET[int(i)] for i in x)


def main(
    method: Literal["plain", "srsmc", "tilt"] = "srsmc",
    num_particles: PositiveInt = 4,
    num_steps: PositiveInt = LENGTH,
    alpha: float = 0.5,
    seed: int = 0,
) -> float:
    """Sample the toy language once and print every number next to the truth.

    Args:
        method: plain (target p0), srsmc (p0^2) or tilt (p0 exp(#c / alpha)).
        num_particles: particles N.
        num_steps: reverse steps, 1 to 6 (the toy length; 6 unmasks one token per step).
        alpha: reward temperature of tilt.
        seed: the generator's seed.

    Returns:
        log Ẑ, the estimate of the exact log normalizer that is printed beside it.
    """
    if num_steps > LENGTH:
        raise ValueError(f"--num_steps {num_steps}: the toy has {LENGTH} tokens; use 1 to {LENGTH}")
    if not alpha > 0 or alpha == float("inf"):
        raise ValueError(f"--alpha {alpha}: the reward temperature must be finite and > 0")
    console = Console()
    denoiser = toy_denoiser()
    sampler, log_target = build(method, denoiser, num_particles, num_steps, alpha)
    out = sampler.sample(LENGTH, batch_size=1, generator=torch.Generator().manual_seed(seed))
    target = torch.softmax(log_target, 0)
    places = len(ALPHABET) ** torch.arange(LENGTH - 1, -1, -1)

    def prob(x: torch.Tensor) -> float:
        return float(target[int((x * places).sum())])

    table = Table(
        title=f"{method}: {num_particles} particles (exact denoiser, alphabet '{ALPHABET}')"
    )
    for col in ("particle", "text", "weight", "target prob"):
        table.add_column(col, justify="left" if col == "text" else "right")
    for i in out.log_weights[0].argsort(descending=True).tolist():
        x = out.tokens[0, i]
        table.add_row(str(i), decode(x), f"{out.weights[0, i]:.3f}", f"{prob(x):.4f}")
    console.print(table)
    ess = " ".join(
        f"{e:.1f}" + ("*" if r else "")
        for e, r in zip(out.ess[0].tolist(), out.resampled[0].tolist(), strict=True)
    )
    console.print(f"ESS after each step (* = resampled): {ess}")
    console.print(f"NFE per sequence: {out.nfe:g}   resamples: {int(out.resampled.sum())}")
    log_z = out.log_normalizer[0].item()
    console.print(
        f"log Ẑ = {log_z:.4f}   exact log Z = {torch.logsumexp(log_target, 0).item():.4f}"
    )
    best = out.best()[0]
    mode = denoiser.states[target.argmax()]
    console.print(
        f"answer (highest weight): [bold]{decode(best)}[/bold] (target prob {prob(best):.4f}); "
        f"the target's mode is {decode(mode)} ({target.max():.4f})"
    )
    return log_z


def cli(args: list[str] | None = None) -> float:
    return auto_cli(main, args=args, parser_mode="yaml")


if __name__ == "__main__":
    cli()
