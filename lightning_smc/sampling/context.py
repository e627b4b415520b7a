"""``StepContext``: what potentials and proposals see at one reverse step.

Rows are particle sequences: ``R = B * N`` (prompt ``b``'s particles are rows ``b*N .. b*N+N-1``).
``x_t [R, L]`` is the current state, ``t [R]`` its block-local time, ``plan`` the step
(``diffusion.StepPlan``), ``cond`` the per-row conditioning, ``rows`` one generator per prompt.
``expand(value)`` repeats a per-prompt value (leading dimension ``B``) to per-row.
``rand_at(mask)`` draws uniforms for the True entries of a per-row mask from each prompt's own
generator, so a prompt's randomness never depends on the rest of the batch. ``confidence [R]``
is written by the move (``sampling.propose.Kernel``): the sum of the untempered
``log p_theta`` of the tokens it committed in each row. ``scratch`` (a
``Scratch``, shared by the steps of one run) holds reusable work buffers, so that the large
per-step draws (``[#masked, V]`` float64) do not allocate fresh memory at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..diffusion import StepPlan
from ..smc import RowGenerators, rand_at

__all__ = [
    "Scratch",
    "StepContext",
    "denoiser_log_probs",
    "expand_rows",
    "index_rows",
    "output_log_probs",
    "outputs_log_probs",
]


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in ``value`` (a tensor, a dict / list / tuple of them,
    nested, or ``None``); anything else is returned as it is."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def expand_rows(value: Any, repeats: int) -> Any:
    """Repeat every tensor in ``value`` (tensor, dict, list/tuple or None) ``repeats`` times on dim 0."""
    return map_tensors(value, lambda t: t.repeat_interleave(repeats, dim=0))


def _broadcast(value: Any, batch: int) -> Any:
    """Tensors in ``value`` with leading dimension 1 repeated to ``batch``."""
    return map_tensors(value, lambda t: t.expand(batch, *t.shape[1:]) if t.shape[:1] == (1,) else t)


def index_rows(value: Any, index: Tensor) -> Any:
    """Select rows ``index`` of every tensor in ``value`` (tensor, dict, list/tuple or None)."""
    return map_tensors(value, lambda t: t[index])


class Scratch:
    """Named work buffers reused across the steps of one sampler run (grown on demand).

    ``get(name, shape, dtype, device)`` returns a contiguous view of buffer ``name`` with that
    shape; its contents are whatever the last user left there, and it stays valid only until the
    next ``get`` of the same name."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != dtype
            or buffer.device != torch.device(device)
        ):
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:numel].view(tuple(shape))


@dataclass
class StepContext:
    x_t: Tensor
    t: Tensor
    plan: StepPlan
    cond: Any
    rows: RowGenerators
    num_particles: int
    mask_id: int
    scratch: Scratch | None = None
    generated: Tensor | None = None  # [R, L] positions masked at the start (not the prompt)
    confidence: Tensor | None = None  # [R] float64, set by the move: sum of committed log p

    @property
    def progress(self) -> float:
        """Fraction of steps done when ``x_t`` was reached (0 fully masked, 1 at the end)."""
        return self.plan.step / self.plan.num_steps

    def expand(self, value: Any) -> Any:
        """A per-prompt value (tensors with leading dimension ``B``, or ``1``: shared by every
        prompt, e.g. a CFG "null" condition) repeated to one entry per row."""
        return expand_rows(_broadcast(value, len(self.rows)), self.num_particles)

    def rand_at(
        self, mask: Tensor, trailing: Sequence[int] = (), out: Tensor | None = None
    ) -> Tensor:
        """Uniforms for ``mask [R, ...]`` (rows grouped by prompt), ``[mask.sum(), *trailing]``;
        ``out``: an optional float64 buffer to draw into (see ``smc.rand_at``)."""
        grouped = mask.reshape(len(self.rows), -1, *mask.shape[1:])
        return rand_at(self.rows, grouped, trailing, out=out)

    def masked(self) -> Tensor:
        return self.x_t == self.mask_id


def denoiser_log_probs(
    logits: Tensor,
    mask_id: int,
    is_log_probs: bool = False,
    *,
    normalize: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """``log p(x0 | x_t)`` with the mask token removed (it is never a clean value).

    ``logits`` is never modified; a contiguous tensor whose mask column is already all ``-inf``
    (MDLM, ``TinyTransformerDenoiser``, ``ExactDenoiser``) is normalized without a copy.
    ``is_log_probs=True`` (see ``outputs_log_probs``): the denoiser already returns
    log-probabilities, so a tensor whose mask column is ``-inf`` is returned as it is (one
    ``[R, L, V]`` pass fewer per step); anything else is normalized as above.
    ``normalize=False``: only remove the mask (the caller normalizes the rows it reads, see
    ``SMCSampler``). ``out``: a buffer of the logits' shape and dtype to normalize into (the
    same values as a fresh result; reusing it avoids faulting in new memory at every step)."""
    mask_free = logits.is_contiguous() and bool(torch.isneginf(logits[..., mask_id]).all())
    if is_log_probs and mask_free:
        return logits
    if not mask_free:
        logits = logits.clone()
        logits[..., mask_id] = -torch.inf
    if not normalize:
        return logits
    if out is not None:
        return torch.log_softmax(logits, dim=-1, out=out)
    return torch.log_softmax(logits, dim=-1)


def output_log_probs(denoiser: Any, output: Tensor) -> Tensor:
    """``denoiser_log_probs`` of ``denoiser``'s ``output``, with its mask id and its
    ``outputs_log_probs`` declaration."""
    return denoiser_log_probs(output, denoiser.mask_id, outputs_log_probs(denoiser))


def outputs_log_probs(denoiser: Any) -> bool:
    """Whether ``denoiser`` declares (``outputs_log_probs = True``) that its outputs are already
    normalized log-probabilities, as MDLM's SUBS parameterization returns."""
    return bool(getattr(denoiser, "outputs_log_probs", False))
