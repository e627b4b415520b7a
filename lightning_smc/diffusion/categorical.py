"""Categorical sampling for masked diffusion: temperature, top-p, one-uniform inverse CDF and
float64 Gumbel-max.

``proposal_log_probs(logits, temperature, top_p, mask_id)`` turns logits ``[..., V]`` into the
log-probabilities ``log q`` of the distribution actually sampled: the mask token removed
(never drawn), divided by ``temperature`` (0 = greedy: a point mass on the argmax), restricted
to the smallest top-probability set with mass ``>= top_p``. Uniforms are passed in so that the
caller controls which generator produced them (one per prompt, see ``smc.seeding``).

``inverse_cdf(probs, u)`` is how the sampler draws tokens: **one** float64 uniform per drawn
position, the first token whose cumulative mass exceeds ``u * total`` (rows need not be
normalized). Precision: the cumulative sum is two-level, float32 sums of chunks of 64 tokens
located in a float64 running total, then a float64 cumulative sum inside the chosen chunk with
the uniform rescaled to that chunk's own total; every token (a tiny-probability one too) is
drawn with its probability up to a relative error of a few float32 ulps, the precision of
``probs`` itself (the concern behind MDLM's float64 Gumbel noise: float32 noise under-samples
low-probability tokens). A token of probability 0 (the mask, ``log q = -inf``) is never drawn.
Cost: one ``exp`` pass over the drawn rows and a few small operations; Gumbel-max instead
needs ``V`` float64 uniforms and two logarithms per drawn row, which cost more than the network
itself when a step draws a candidate at every masked position (``low_confidence``).

``gumbel_max(log_q, u)``: ``argmax(log_q + G)``, ``G = -log(-log u)`` in float64, with ``V``
uniforms per row: the textbook reference draw, used by ``sample_categorical`` and the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gumbel_max", "inverse_cdf", "proposal_log_probs", "sample_categorical"]

_TINY = torch.finfo(torch.float64).tiny


def proposal_log_probs(
    logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, mask_id: int | None = None
) -> Tensor:
    """Normalized log-probabilities of the tempered, top-p filtered distribution (mask excluded)."""
    if not 0 <= temperature < torch.inf:  # NaN and inf included
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
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
    """``argmax(log_q + G)`` with ``G = -log(-log u)`` in float64; ``u`` uniforms broadcastable
    to ``log_q`` (``V`` per row). Kept as the textbook reference draw (``sample_categorical``);
    the sampler draws with ``inverse_cdf`` (one uniform per row)."""
    gumbel = -torch.log(-torch.log(u.to(torch.float64).clamp_min(_TINY)))
    return (log_q.to(torch.float64) + gumbel).argmax(dim=-1)


_CHUNK = 64  # tokens per chunk of inverse_cdf's two-level cumulative sum


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Indices ``[M]``: row ``m`` of ``probs [M, V]`` (non-negative, not necessarily normalized)
    sampled with the single uniform ``u[m]`` in ``[0, 1)``: the first ``v`` with
    ``sum_{w <= v} probs[m, w] > u[m] * sum_w probs[m, w]``.

    A row whose total is zero or not finite (all log-probabilities ``-inf``, or NaN) raises."""
    if probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(
            f"probs must be a float tensor [M, V], got {probs.dtype} {tuple(probs.shape)}"
        )
    M, V = probs.shape
    if u.shape != (M,):
        raise ValueError(f"u must have shape [{M}] (one uniform per row), got {tuple(u.shape)}")
    C = _CHUNK
    full = V // C
    sums = probs[:, : full * C].view(M, full, C).sum(-1)
    if full * C < V:
        sums = torch.cat([sums, probs[:, full * C :].sum(-1, keepdim=True)], dim=-1)
    sums = sums.to(torch.float64)
    cum = sums.cumsum(-1)
    total = cum[:, -1]
    if M and not bool(((total > 0) & total.isfinite()).all()):
        raise ValueError(
            "inverse_cdf: a row has no probability mass or a NaN/inf entry (its log-probabilities "
            "are all -inf or not finite)"
        )
    target = u.to(torch.float64) * total
    # rounding (u * total == total) can point past the last chunk with mass: take that chunk
    last_chunk = (sums.shape[-1] - 1) - (sums.flip(-1) > 0).to(torch.uint8).argmax(-1)
    chunk = torch.minimum((cum <= target.unsqueeze(-1)).sum(-1), last_chunk).unsqueeze(-1)
    mass = sums.gather(-1, chunk).squeeze(-1)
    start = cum.gather(-1, chunk).squeeze(-1) - mass
    fraction = ((target - start) / mass).clamp_(0.0, 1.0)
    cols = chunk * C + torch.arange(C, device=probs.device)
    inner = probs.gather(-1, cols.clamp_max(V - 1)).to(torch.float64)
    inner.masked_fill_(cols >= V, 0.0)
    inner_cum = inner.cumsum(-1)
    k = (inner_cum <= (fraction * inner_cum[:, -1]).unsqueeze(-1)).sum(-1)
    # rounding can leave k past the last token with mass: take that token instead
    last = (C - 1) - (inner.flip(-1) > 0).to(torch.uint8).argmax(-1)
    return chunk.squeeze(-1) * C + torch.minimum(k, last)


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
