"""Helpers for exact-enumeration tests: a toy joint, target distributions and an
Ẑ-weighted estimator whose tolerance comes from the number of independent replicates.

For SMC, ``E[Ẑ * sum_i W_i f(x_i)] = Z * pi(f)`` for any ``N``; so pooling ``B`` independent
runs with weights ``Ẑ_b W_bi`` gives a ratio estimator of ``pi`` that is consistent in ``B`` with
no finite-``N`` bias. Its standard error comes from the delta method over replicates.
"""

from __future__ import annotations

import torch

import lightning_smc as ls

V, L = 3, 4


def toy_joint(seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand((V,) * L, generator=g, dtype=torch.float64) ** sharpness + 0.02
    return p / p.sum()


def state_index(x: torch.Tensor) -> torch.Tensor:
    return (x * (V ** torch.arange(L - 1, -1, -1))).sum(-1)


def enumerate_states() -> torch.Tensor:
    return ls.ExactDenoiser(torch.ones((V,) * L)).states


def estimate(out: ls.SMCOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Ẑ-weighted pooled estimate of the target over the ``V**L`` states and its standard error."""
    B, N, _ = out.tokens.shape
    S = V**L
    z = torch.exp(out.log_normalizer - out.log_normalizer.max())  # [B], common scale
    a = torch.zeros(B, S, dtype=torch.float64)
    a.scatter_add_(1, state_index(out.tokens), out.weights * z.unsqueeze(1))
    pi_hat = a.sum(0) / z.sum()
    resid = a - pi_hat.unsqueeze(0) * z.unsqueeze(1)
    se = resid.std(0) / (z.mean() * B**0.5)
    return pi_hat, se


def max_z_score(
    pi_hat: torch.Tensor, se: torch.Tensor, target: torch.Tensor, num_samples: int
) -> float:
    """Largest per-state ``|pi_hat - pi| / SE``. The SE is floored at the iid binomial SE of
    ``num_samples`` draws, so a rarely visited state cannot make the test vacuous or infinite."""
    target = target / target.sum()
    floor = (target * (1 - target) / num_samples).sqrt()
    return float(((pi_hat - target).abs() / torch.maximum(se, floor)).max())


def z_of_normalizer(out: ls.SMCOutput, Z: float) -> float:
    """z-score of the sample mean of Ẑ against the true ``Z``."""
    zhat = torch.exp(out.log_normalizer)
    err = float((zhat.mean() - Z).abs())
    se = float(zhat.std() / len(zhat) ** 0.5)
    if se == 0.0:  # a deterministic Ẑ (no weights) must be exact
        return 0.0 if err < 1e-9 * max(Z, 1.0) else float("inf")
    return err / se
