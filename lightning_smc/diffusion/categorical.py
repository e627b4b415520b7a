"""Categorical sampling for masked diffusion: temperature, top-p, float64 Gumbel-max.

``proposal_log_probs(logits, temperature, top_p, mask_id)`` turns logits ``[..., V]`` into the
log-probabilities ``log q`` of the distribution actually sampled: the mask token removed
(never drawn), divided by ``temperature`` (0 = greedy: a point mass on the argmax), restricted
to the smallest top-probability set with mass ``>= top_p``. Samplers draw with
``gumbel_max(log_q, u)``: ``argmax(log_q + G)``, ``G = -log(-log u)`` in float64 (float32 Gumbel
noise biases low-probability tokens, as MDLM notes). Uniforms ``u`` are passed in so that the
caller controls which generator produced them (one per prompt, see ``smc.seeding``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gumbel_max", "proposal_log_probs", "sample_categorical"]

_TINY = torch.finfo(torch.float64).tiny


def proposal_log_probs(
    logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, mask_id: int | None = None
) -> Tensor:
    """Normalized log-probabilities of the tempered, top-p filtered distribution (mask excluded)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.clone()
    if mask_id is not None:
        logits[..., mask_id] = -torch.inf
    if temperature == 0:
        greedy = torch.full_like(logits, -torch.inf)
        return greedy.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        log_q = _top_p(log_q, top_p)
    return log_q


def _top_p(log_q: Tensor, top_p: float) -> Tensor:
    sorted_lq, order = log_q.sort(dim=-1, descending=True)
    mass_before = sorted_lq.exp().cumsum(-1) - sorted_lq.exp()
    drop_sorted = mass_before >= top_p  # keeps the first token always
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(log_q.masked_fill(drop, -torch.inf), dim=-1)


def gumbel_max(log_q: Tensor, u: Tensor) -> Tensor:
    """``argmax(log_q + Gumbel(u))`` in float64; ``u`` uniforms of the same shape."""
    gumbel = -torch.log(-torch.log(u.to(torch.float64).clamp_min(_TINY)))
    return (log_q.to(torch.float64) + gumbel).argmax(dim=-1)


def sample_categorical(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    mask_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw tokens ``[...]`` from ``logits [..., V]``; returns ``(tokens, log q(tokens))``."""
    log_q = proposal_log_probs(logits, temperature, top_p, mask_id)
    device = generator.device if generator is not None else logits.device
    u = torch.rand(log_q.shape, generator=generator, dtype=torch.float64, device=device).to(
        logits.device
    )
    tokens = gumbel_max(log_q, u)
    return tokens, log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
