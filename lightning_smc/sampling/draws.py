"""Token draws at chosen positions of the ``[R, L, V]`` log-probabilities of one step.

Notation as in ``sampler``: ``R`` particle rows of length ``L``; a *flat position* is ``r * L +
l``. After a resample without the logit cache the log-probs are not gathered: row ``r`` of
``x_t`` reads row ``index[r]`` of them, and ``source`` maps flat positions of ``x_t`` to flat rows
of the log-probs (``None``: the identity). Every draw takes one float64 uniform per position
from the prompt's own generator (``StepContext.rand_at``) and goes through ``inverse_cdf``
(``diffusion.categorical``); the ``[M, V]`` rows drawn from live in ``ctx.scratch`` buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion import inverse_cdf
from .context import StepContext

__all__ = ["entries", "flat_index", "inverse_cdf_at", "row_source", "source_rows"]


def flat_index(mask: Tensor) -> Tensor:
    """Indices of the True entries of ``mask [R, L]`` in the flattened ``[R * L]`` (row-major)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def row_source(index: Tensor | None, length: int) -> Tensor | None:
    """Flat position ``r * L + l`` of ``x_t`` -> flat row ``index[r] * L + l`` of the log-probs
    (``None`` when they were gathered, i.e. ``index is None``)."""
    if index is None:
        return None
    return (index.unsqueeze(1) * length + torch.arange(length, device=index.device)).reshape(-1)


def source_rows(at: Tensor, source: Tensor | None) -> Tensor:
    """Flat positions ``at`` of ``x_t`` as flat rows of the (not gathered) log-probs."""
    return at if source is None else source[at]


def entries(values: Tensor, at: Tensor, tokens: Tensor) -> Tensor:
    """``values[r, l, tokens]`` at the flat positions ``at = r * L + l`` of ``values [R, L, V]``."""
    return values.reshape(-1, values.shape[-1])[at, tokens]


def _gather_rows(ctx: StepContext, log_q: Tensor, rows_at: Tensor) -> Tensor:
    """Rows ``rows_at`` of ``log_q [.., V]`` as ``[M, V]`` (in a ``ctx.scratch`` buffer if any)."""
    flat = log_q.reshape(-1, log_q.shape[-1])
    if ctx.scratch is None:
        return flat[rows_at]
    rows = ctx.scratch.get(
        "log_q_rows", (rows_at.numel(), flat.shape[-1]), log_q.dtype, log_q.device
    )
    return torch.index_select(flat, 0, rows_at, out=rows)


def _softmax(ctx: StepContext, rows: Tensor) -> Tensor:
    """``softmax`` of gathered logit rows (into a scratch buffer if any)."""
    if ctx.scratch is None:
        return torch.softmax(rows, dim=-1)
    out = ctx.scratch.get("normalized_rows", rows.shape, rows.dtype, rows.device)
    return torch.softmax(rows, dim=-1, out=out)


def inverse_cdf_at(
    ctx: StepContext, log_q: Tensor, where: Tensor, rows_at: Tensor, normalize: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Tokens at the True entries of ``where [R, L]`` (rows ``rows_at`` of ``log_q``), one
    float64 uniform each from the prompt's generator: ``inverse_cdf(exp(log_q[where]), u)``.
    ``normalize``: ``log_q`` holds logits; the gathered rows go through one ``softmax`` (a
    single pass, cheaper on CPU than ``log_softmax`` and then ``exp``), the tokens are drawn
    from those probabilities and their log-probabilities ``log softmax[token]`` are returned too
    (else ``None``). A drawn token has a normal (not subnormal) probability except with
    probability below ``V * 1.2e-38``, so its log matches ``log_softmax`` to float rounding."""
    rows = _gather_rows(ctx, log_q, rows_at)
    u = ctx.rand_at(where)
    if not normalize:  # (rows is a copy: exponentiate it in place)
        return inverse_cdf(rows.exp_(), u), None
    probs = _softmax(ctx, rows)
    tokens = inverse_cdf(probs, u)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()
