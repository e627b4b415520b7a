"""The denoiser contract (``ls.Denoiser``) and an exact denoiser for enumerable problems.

A denoiser maps ``(x_t [B, L] long, t [B] float, cond)`` to logits ``[B, L, vocab_size]`` of
``p_theta(x0 | x_t)``; ``vocab_size`` includes ``mask_id``. It never samples (DESIGN.md §2).
A denoiser whose outputs are already normalized log-probabilities with the mask logit
``-inf`` (MDLM's SUBS parameterization) may say so with ``outputs_log_probs = True``; the
sampler then uses them as they are instead of renormalizing (optional; default ``False``).

**Sub-vocabulary outputs and grids.** A network that scores only part of the vocabulary (a VQ
codebook of ``K`` = 8,192 ids inside a vocabulary of 8,256 whose last id is the mask) is wrapped
by ``CodebookDenoiser(network, vocab_size, mask_id)``: the network returns ``[B, L, K]`` logits
of the ids ``0 .. K-1`` and the denoiser returns ``[B, L, vocab_size]`` with ``-inf`` elsewhere,
so the sampler never draws an id outside the codebook (nor the mask). Images are flattened
token grids ``x_t [B, H * W]`` (row-major); the denoiser knows its ``grid_shape = (H, W)`` and
reshapes inside, the sampler sees sequences of length ``H * W``.

**Per-row state.** A denoiser may keep per-row state between calls (a KV cache of a prompt or of
finished blocks). It then defines ``reorder_state(index)``: the sampler calls it whenever rows
move — at the start of a run (``index[r]``: the prompt of row ``r``), after every resample
(``index[r]``: the row whose state row ``r`` now holds) and after a sharded exchange (``-1``: a
row that arrived from another process; rebuild its state). Such a denoiser sees all rows at
every call (the logit cache, which evaluates only changed rows, is refused for it).

**Structured conditioning.** ``cond`` is ``None``, a tensor ``[B, ...]`` or a dict / list of
such tensors (a class label; text embeddings, a pooled embedding and micro-conditions); the
sampler expands it to one entry per particle row and keeps it with its row.

``ExactDenoiser`` holds a joint distribution ``p0`` over ``V^L`` (small ``V`` and ``L``) and
returns its exact conditionals: for a masked position ``i``,
``p(x0_i = v | x_t) = sum_{x ~ x_t, x_i = v} p0(x) / sum_{x ~ x_t} p0(x)`` where ``x ~ x_t``
means ``x`` agrees with every clean token of ``x_t`` (absorbing masking is uniform, so the
posterior does not depend on ``t``). Clean positions get a one-hot (SUBS carry-over); the mask
logit is ``-inf``. ``cond`` (a LongTensor ``[B]``) selects one of several joints, which gives
"one denoiser under two conditions" for product targets; ``cond=None`` selects joint 0.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CodebookDenoiser", "Denoiser", "ExactDenoiser"]


@runtime_checkable
class Denoiser(Protocol):
    vocab_size: int
    mask_id: int

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor: ...


class ExactDenoiser:
    """Exact ``p(x0 | x_t)`` of joint(s) ``p0`` given as probabilities ``[C, V, ..., V]`` or ``[V, ..., V]``."""

    def __init__(self, joint: Tensor):
        joint = torch.as_tensor(joint, dtype=torch.float64)
        V = joint.shape[-1]
        if joint.dim() >= 2 and all(s == V for s in joint.shape[1:]) and joint.shape[0] != V:
            tables = joint
        else:
            tables = joint.unsqueeze(0)
        if (tables < 0).any():
            raise ValueError("joint probabilities must be non-negative")
        self.length = tables.dim() - 1
        self.num_values = V
        self.vocab_size = V + 1
        self.mask_id = V
        self.probs = tables.reshape(tables.shape[0], -1) / tables.reshape(tables.shape[0], -1).sum(
            -1, keepdim=True
        )
        self.states = torch.tensor(list(itertools.product(range(V), repeat=self.length)))  # [S, L]

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        table = self.probs[0].expand(x_t.shape[0], -1) if cond is None else self.probs[cond.long()]
        states = self.states.to(x_t.device)
        consistent = ((x_t.unsqueeze(1) == self.mask_id) | (x_t.unsqueeze(1) == states)).all(
            -1
        )  # [B, S]
        mass = table.to(x_t.device) * consistent  # [B, S]
        one_hot = torch.nn.functional.one_hot(states, self.num_values).to(mass.dtype)  # [S, L, V]
        marg = torch.einsum("bs,slv->blv", mass, one_hot)
        logits = torch.log(marg / marg.sum(-1, keepdim=True))
        clean = x_t != self.mask_id
        carry = torch.log(
            torch.nn.functional.one_hot(x_t.clamp_max(self.num_values - 1), self.num_values).to(
                mass.dtype
            )
        )
        logits = torch.where(clean.unsqueeze(-1), carry, logits)
        return torch.cat([logits, torch.full_like(logits[..., :1], -torch.inf)], dim=-1)

    def log_prob(self, x0: Tensor, cond: int = 0) -> Tensor:
        """``log p0(x0)`` for complete sequences ``[B, L]``."""
        index = (
            x0 * (self.num_values ** torch.arange(self.length - 1, -1, -1, device=x0.device))
        ).sum(-1)
        return torch.log(self.probs[cond].to(x0.device)[index])


class CodebookDenoiser(torch.nn.Module):
    """A denoiser over ``vocab_size`` ids from a network that scores only the first ``K``.

    ``network(x_t, t, cond) -> [B, L, K]`` logits of ids ``0 .. K-1`` (the codebook); the
    result is ``[B, L, vocab_size]`` with ``-inf`` at every other id, including ``mask_id``
    (which must lie outside the codebook). ``grid_shape`` (e.g. ``(H, W)``) is carried for
    networks over token grids; the sequence length must then be ``H * W``."""

    def __init__(
        self,
        network: Any,
        vocab_size: int,
        mask_id: int,
        grid_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.network, self.vocab_size, self.mask_id = network, int(vocab_size), int(mask_id)
        self.grid_shape = None if grid_shape is None else tuple(int(n) for n in grid_shape)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self.grid_shape is not None and x_t.shape[1] != math.prod(self.grid_shape):
            raise ValueError(
                f"CodebookDenoiser: sequences of length {x_t.shape[1]} are not token grids of "
                f"shape {self.grid_shape} (length {math.prod(self.grid_shape)})"
            )
        logits = self.network(x_t, t, cond)
        K = logits.shape[-1]
        if logits.shape[:2] != x_t.shape or not 0 < K <= self.mask_id:
            raise ValueError(
                f"CodebookDenoiser: {type(self.network).__name__} returned {tuple(logits.shape)}; "
                f"expected [{x_t.shape[0]}, {x_t.shape[1]}, K] with 0 < K <= mask_id={self.mask_id}"
            )
        full = logits.new_full((*logits.shape[:2], self.vocab_size), -torch.inf)
        full[..., :K] = logits
        return full
