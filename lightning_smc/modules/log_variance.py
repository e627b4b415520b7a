"""The log-variance objective of the amortized proposal (SMCamot), as plain functions.

For a transition ``x_t -> x_s`` that commits tokens at positions ``C`` under the reward tilt
``p_theta(x) exp(r(x) / alpha)`` with twist ``log gamma``,

    log w = log gamma_s(x_s) - log gamma_t(x_t)
            + sum_{i in C} [log p_theta(x_s^i | x_t) - log q_phi(x_s^i | x_t)]

(``transition_log_weights``), and the loss is ``mean((log w - F_psi(t))^2)``
(``log_variance_loss``) with ``F_psi`` a learned log-normalizer per time (``LogNormalizer``).
``AmortizedProposalModule`` (``modules.amortized``) trains ``q_phi`` and ``F_psi`` with them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..sampling.context import output_log_probs
from ..sampling.output import SMCPath

__all__ = ["LogNormalizer", "log_variance_loss", "transition_log_weights"]


class LogNormalizer(nn.Module):
    """``F_psi``: a learned log-normalizer per transition time.

    ``kind="per_step"``: one scalar per step index (``num_steps`` of them, zero-initialised);
    ``kind="mlp"``: ``MLP(sin/cos features of t)`` with a zero-initialised output layer."""

    def __init__(self, num_steps: int, kind: str = "per_step", hidden: int = 32):
        super().__init__()
        if kind not in ("per_step", "mlp"):
            raise ValueError(f"F_psi kind must be 'per_step' or 'mlp', got {kind!r}")
        self.kind, self.num_steps = kind, num_steps
        if kind == "per_step":
            self.values = nn.Parameter(torch.zeros(num_steps))
        else:
            self.mlp = nn.Sequential(nn.Linear(8, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, step: Tensor, t: Tensor) -> Tensor:
        if self.kind == "per_step":
            if int(step.max()) >= self.num_steps:
                raise ValueError(
                    f"step {int(step.max())} is beyond F_psi's {self.num_steps} per-step values"
                )
            return self.values[step]
        freqs = torch.arange(1, 5, device=t.device, dtype=torch.float32) * math.pi
        angles = t.float().unsqueeze(-1) * freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], -1)).squeeze(-1)


def transition_log_weights(
    path: SMCPath,
    base: Any,
    proposal: Any,
    mask_id: int,
    cond: Any = None,
    kl: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``log w [K, R]`` of the ``K`` transitions in ``path`` (float64; differentiable in the
    proposal's parameters, not in the base's), and the mean ``KL(q || p)`` over the masked
    positions of each transition ``[K, R]`` when ``kl``.

    ``base`` and ``proposal`` are denoisers; ``cond`` is per row ``[R, ...]`` (or ``None``)."""
    K, R, Lq = path.x_from.shape
    x_from = path.x_from.reshape(K * R, Lq)
    x_to = path.x_to.reshape(K * R, Lq)
    t = path.t.to(x_from.device).repeat_interleave(R)
    rows_cond = _repeat_cond(cond, K)
    with torch.no_grad():
        log_p = output_log_probs(base, base(x_from, t, rows_cond))
    log_q = output_log_probs(proposal, proposal(x_from, t, rows_cond))
    committed = (x_from == mask_id) & (x_to != mask_id)
    index = x_to.clamp_max(log_p.shape[-1] - 1).unsqueeze(-1)
    step_p = log_p.gather(-1, index).squeeze(-1).double()
    step_q = log_q.gather(-1, index).squeeze(-1).double()
    zero = torch.zeros((), dtype=torch.float64, device=x_from.device)
    log_ratio = torch.where(committed, step_p - step_q, zero).sum(-1)
    log_w = (path.twist_to - path.twist_from).reshape(-1) + log_ratio
    if not torch.isfinite(log_w).all():
        raise ValueError(
            "a transition has a non-finite log-weight: the proposal gives zero probability to a "
            "token the rollout committed (or the base does); check that rollouts came from this "
            "proposal at temperature 1 and top_p 1"
        )
    divergence = None
    if kl:
        masked = x_from == mask_id
        q = log_q.exp()
        terms = torch.where(q > 0, q * (log_q - log_p.clamp_min(-1e4)), torch.zeros_like(q))
        per_pos = terms.sum(-1)
        divergence = (per_pos * masked).sum(-1) / masked.sum(-1).clamp_min(1)
        divergence = divergence.reshape(K, R)
    return log_w.reshape(K, R), divergence


def log_variance_loss(log_w: Tensor, log_normalizer: Tensor) -> Tensor:
    """``mean((log w - F_psi(t))^2)`` with ``log_normalizer`` broadcast over rows ``[K, 1]``."""
    return ((log_w - log_normalizer.to(log_w.dtype)) ** 2).mean()


def _repeat_cond(cond: Any, times: int) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat(times, *([1] * (cond.dim() - 1)))
    raise TypeError("AmortizedProposalModule supports cond=None or a per-row tensor")
