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
uniforms per row (``sample_categorical`` uses it). It returns exactly
``(log_q.double() - log(-log u.clamp_min(tiny))).argmax(-1)`` (same float64 operations, same
first-index tie-break) but avoids most of that work on large vocabularies: an exact bound from
two evaluated candidates per row (the largest ``u`` and the largest ``log_q``) rules out every
token that cannot reach the maximum, only the survivors' Gumbel noise is evaluated, and anything
that could be a near tie (within ``1e-9``, far above the few-ulp rounding differences of
``log``) falls back to the full computation, so the result never differs from it.
``overwrite_u=True`` lets it use ``u`` as its float64 work buffer.
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


def gumbel_max(log_q: Tensor, u: Tensor, *, overwrite_u: bool = False) -> Tensor:
    """``argmax(log_q + Gumbel(u))`` in float64; ``u`` uniforms of the same shape.

    ``u`` is left unchanged unless ``overwrite_u=True`` (then, if it is float64, its contents
    are undefined afterwards: the caller's scratch buffer is reused for the noise)."""
    if log_q.shape != u.shape or u.dim() == 0:  # broadcasting: the plain formula
        gumbel = -torch.log(-torch.log(u.to(torch.float64).clamp_min(_TINY)))
        return (log_q.to(torch.float64) + gumbel).argmax(dim=-1)
    V = u.shape[-1]
    if (
        u.dtype == torch.float64
        and V >= _PRUNE_MIN_VOCAB
        and u.numel() >= _PRUNE_MIN_NUMEL
        and log_q.is_floating_point()
    ):
        index = _pruned_argmax(log_q.reshape(-1, V), u.reshape(-1, V))
        if index is not None:
            return index.view(u.shape[:-1])
    return _full_argmax(log_q, u, overwrite_u)


# The pruned path pays for itself on large vocabularies (a few cheap passes over [M, V] instead
# of two float64 logarithms); tests lower these to exercise it on small problems.
_PRUNE_MIN_VOCAB = 256
_PRUNE_MIN_NUMEL = 1 << 17  # below ~32 rows of 4096 the full path is faster (measured)
_PRUNE_MAX_SURVIVORS = 0.25  # fall back when more than this fraction of [M, V] survives
_PRUNE_SPARSE = 1 / 64  # apply the log_q bound only when the u bound keeps more than this
_MARGIN = 1e-6  # relative slack of the bounds (rounding of log is ~1e-15)
_NEAR_TIE = 1e-9  # relative gap below which the winner is recomputed the reference way


def _gumbel_(u64: Tensor) -> Tensor:
    """``-log(-log(max(u, tiny)))`` in place on a float64 tensor (same ops as out of place)."""
    return u64.clamp_min_(_TINY).log_().neg_().log_().neg_()


def _values(log_q: Tensor, u: Tensor) -> Tensor:
    """``log_q + G(u)`` in float64 for gathered entries (a fresh tensor)."""
    return _gumbel_(u.to(torch.float64, copy=True)).add_(log_q)


def _full_argmax(log_q: Tensor, u: Tensor, overwrite_u: bool) -> Tensor:
    """The reference computation, in place on ``u`` when allowed (bit-identical to
    ``(log_q.to(float64) - torch.log(-torch.log(u.to(float64).clamp_min(tiny)))).argmax(-1)``:
    negation, clamping and float64 promotion are exact and ``a + b == b + a``)."""
    own = overwrite_u and u.dtype == torch.float64 and u.is_contiguous()
    noise = _gumbel_(u if own else u.to(torch.float64).clamp_min(_TINY))
    return noise.add_(log_q).argmax(dim=-1)


def _pruned_argmax(log_q: Tensor, u: Tensor) -> Tensor | None:
    """``argmax`` rows of ``[M, V]`` from a survivor subset; ``None`` = use the full path.

    Let ``c`` be the larger value of two evaluated candidates (argmax ``u``, argmax ``log_q``),
    ``G* = G(max u)`` and ``q* = max log_q``. A token ``v`` can reach ``c`` only if
    ``log_q[v] >= c - G*`` and ``G(u[v]) >= c - q*``, i.e. ``u[v] >= exp(-exp(q* - c))``; both
    bounds get a relative slack ``_MARGIN`` (and the ``u`` bound 4 ulps) so that rounding of the
    logarithms cannot exclude the winner. Survivors are evaluated with the same float64 ops;
    a row is accepted only if its best survivor is unique and beats the runner-up by more than
    ``_NEAR_TIE`` (relative), which no few-ulp difference between how ``log`` rounds in
    different memory layouts can overturn."""
    M, V = u.shape
    u_max, v_u = u.max(dim=-1)
    lq_max, v_q = log_q.max(dim=-1)
    candidates = torch.stack([v_u, v_q], dim=-1)  # [M, 2]
    c = _values(log_q.gather(-1, candidates), u.gather(-1, candidates)).amax(dim=-1)
    g_max = _gumbel_(u_max.to(torch.float64, copy=True))
    lq_max = lq_max.to(torch.float64)
    if not bool((c.isfinite() & g_max.isfinite() & lq_max.isfinite()).all()):
        return None  # NaN, u >= 1 or infinite log_q: leave it to the reference computation
    slack = _MARGIN * (1.0 + c.abs())
    lq_floor = c - g_max - slack
    u_floor = torch.exp(-torch.exp(lq_max - c + slack))
    zero = torch.zeros_like(u_floor)
    for _ in range(4):
        u_floor = torch.nextafter(u_floor, zero)
    # G sees max(u, tiny): below tiny the bound on u says nothing
    u_floor = u_floor.masked_fill(u_floor <= _TINY, -torch.inf)
    if log_q.dtype == torch.float32:  # compare in float32 against a threshold rounded down
        lq_floor = torch.nextafter(lq_floor.float(), torch.tensor(-torch.inf, device=u.device))
    keep = u >= u_floor.unsqueeze(-1)
    if int(torch.count_nonzero(keep)) > _PRUNE_SPARSE * M * V:  # else the u bound suffices
        keep &= log_q >= lq_floor.unsqueeze(-1)
    row, col = keep.nonzero(as_tuple=True)
    if row.numel() > _PRUNE_MAX_SURVIVORS * M * V:
        return None
    values = _values(log_q[row, col], u[row, col])
    neg_inf = torch.full((M,), -torch.inf, dtype=torch.float64, device=u.device)
    best = neg_inf.clone().scatter_reduce_(0, row, values, "amax")
    is_best = values == best[row]
    runner_up = neg_inf.clone().scatter_reduce_(0, row[~is_best], values[~is_best], "amax")
    count = torch.zeros(M, dtype=torch.long, device=u.device).index_add_(0, row, is_best.long())
    clear = (count == 1) & (best - runner_up > _NEAR_TIE * (1.0 + best.abs()))
    if not bool(clear.all()):
        return None
    return col[is_best]


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
