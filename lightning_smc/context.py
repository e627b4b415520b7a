"""``StepContext``: what potentials and proposals see at one reverse step.

Rows are particle sequences: ``R = B * N`` (prompt ``b``'s particles are rows ``b*N .. b*N+N-1``).
``x_t [R, L]`` is the current state, ``t [R]`` its block-local time, ``plan`` the step
(``diffusion.StepPlan``), ``cond`` the per-row conditioning, ``rows`` one generator per prompt.
``expand(value)`` repeats a per-prompt value (leading dimension ``B``) to per-row.
``rand_at(mask)`` draws uniforms for the True entries of a per-row mask from each prompt's own
generator, so a prompt's randomness never depends on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .diffusion import StepPlan
from .smc import RowGenerators, rand_at

__all__ = ["StepContext", "denoiser_log_probs", "expand_rows", "index_rows"]


def expand_rows(value: Any, repeats: int) -> Any:
    """Repeat every tensor in ``value`` (tensor, dict, list/tuple or None) ``repeats`` times on dim 0."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.repeat_interleave(repeats, dim=0)
    if isinstance(value, dict):
        return {k: expand_rows(v, repeats) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(expand_rows(v, repeats) for v in value)
    return value


def index_rows(value: Any, index: Tensor) -> Any:
    """Select rows ``index`` of every tensor in ``value`` (tensor, dict, list/tuple or None)."""
    if isinstance(value, Tensor):
        return value[index]
    if isinstance(value, dict):
        return {k: index_rows(v, index) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(index_rows(v, index) for v in value)
    return value


@dataclass
class StepContext:
    x_t: Tensor
    t: Tensor
    plan: StepPlan
    cond: Any
    rows: RowGenerators
    num_particles: int
    mask_id: int

    @property
    def progress(self) -> float:
        """Fraction of steps done when ``x_t`` was reached (0 fully masked, 1 at the end)."""
        return self.plan.step / self.plan.num_steps

    def expand(self, value: Any) -> Any:
        return expand_rows(value, self.num_particles)

    def rand_at(self, mask: Tensor, trailing: Sequence[int] = ()) -> Tensor:
        """Uniforms for ``mask [R, ...]`` (rows grouped by prompt), ``[mask.sum(), *trailing]``."""
        grouped = mask.reshape(len(self.rows), -1, *mask.shape[1:])
        return rand_at(self.rows, grouped, trailing)

    def masked(self) -> Tensor:
        return self.x_t == self.mask_id


def denoiser_log_probs(logits: Tensor, mask_id: int) -> Tensor:
    """``log p(x0 | x_t)`` with the mask token removed (it is never a clean value)."""
    logits = logits.clone()
    logits[..., mask_id] = -torch.inf
    return torch.log_softmax(logits, dim=-1)
