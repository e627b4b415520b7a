"""Logit cache for the shared sampler (MDLM's ``ddpm_cache``, generalised to particles).

When no token of a particle row changed since its logits were computed, ``p_theta(x0 | x_t)``
is the same (for a denoiser without time conditioning), so the row is not re-evaluated. With
``enabled=False`` every row is evaluated at every step. ``evaluations`` counts the row-level
network evaluations actually performed: ``evaluations / R`` is the honest NFE per sequence.
Rows follow their ancestors through ``reorder`` after a resample; when particles are sharded
over processes (``sampling.layouts.ParticleShards``), rows received from another process are evaluated
with ``evaluate`` (counted in ``evaluations``) and the new state is set with ``adopt``.

**Per-row state.** ``followers`` are the networks of the run that keep per-row state (a KV
cache): ``reorder_state(index)`` tells each of them how the rows moved (row ``r`` now holds what
row ``index[r]`` held; ``-1``: a row that arrived from another process, whose state must be
rebuilt). The sampler announces the expansion of prompts to particles (``index[r]`` is then
the prompt of row ``r``), every resample and every sharded exchange. A stateful network must
see all rows at every call, so ``enabled=True`` (which evaluates only the changed rows) is
refused for one.

``normalize=False`` returns the denoiser's outputs with the mask removed but not normalized:
the sampler then normalizes only the rows it reads (``SMCSampler`` decides when that is
exact). Full normalizations are written into one reused buffer (no fresh ``[R, L, V]`` memory
per step); a returned tensor is valid until the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..models.base import Denoiser
from .checks import check_denoiser_output
from .context import denoiser_log_probs, index_rows, outputs_log_probs

__all__ = ["CachedDenoiser"]


class CachedDenoiser:
    def __init__(
        self,
        denoiser: Denoiser,
        enabled: bool = False,
        normalize: bool = True,
        followers: Sequence[Any] = (),
    ):
        if enabled and getattr(denoiser, "time_conditioning", False):
            raise ValueError(
                "cache=True needs a denoiser without time conditioning (its logits must depend on "
                "x_t only); set cache=False or use a model with time_conditioning=False"
            )
        if enabled and followers:
            names = ", ".join(type(f).__name__ for f in followers)
            raise ValueError(
                f"cache=True evaluates only the rows that changed, but {names} keeps per-row "
                "state (reorder_state) and must see every row; set cache=False"
            )
        self.denoiser, self.enabled = denoiser, enabled
        self.followers = list(followers)
        self.is_log_probs = outputs_log_probs(denoiser)
        self.normalize = normalize
        self._buffer: Tensor | None = None
        self.x: Tensor | None = None
        self.log_probs: Tensor | None = None
        self.evaluations = 0
        self.checked = False  # the first output of a run is checked (checks.check_denoiser_output)

    def _forward(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        output = self.denoiser(x_t, t, cond)
        if not self.checked:
            check_denoiser_output(self.denoiser, output, x_t)
            self.checked = True
        return output

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """``log p_theta(x0 | x_t)`` with the mask removed, ``[R, L, V]``."""
        if not self.enabled or self.x is None:
            self.log_probs = self._log_probs(self._forward(x_t, t, cond), reuse=True)
            self.evaluations += x_t.shape[0]
        else:
            stale = (x_t != self.x).any(-1).nonzero().flatten()
            if len(stale) == x_t.shape[0]:
                self.log_probs = self._log_probs(self._forward(x_t, t, cond), reuse=True)
            elif len(stale):
                fresh = self._forward(x_t[stale], t[stale], index_rows(cond, stale))
                self.log_probs = self.log_probs.clone()
                self.log_probs[stale] = self._log_probs(fresh)
            self.evaluations += len(stale)
        self.x = x_t
        return self.log_probs

    @property
    def stateful(self) -> bool:
        return bool(self.followers)

    def reorder_state(self, index: Tensor) -> None:
        """Announce a movement of rows to every stateful network (see the module docstring)."""
        for network in self.followers:
            network.reorder_state(index)

    def reorder(self, index: Tensor) -> Tensor:
        """Rows follow their ancestors; returns the reordered log-probabilities."""
        self.x, self.log_probs = self.x[index], self.log_probs[index]
        return self.log_probs

    def evaluate(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """``log p_theta(x0 | x_t)`` of rows outside the cache (e.g. particles received from
        another process), counted in ``evaluations``; the cache is left as it is."""
        self.evaluations += x_t.shape[0]
        return self._log_probs(self._forward(x_t, t, cond))

    def _log_probs(self, output: Tensor, reuse: bool = False) -> Tensor:
        """Normalized (or, with ``normalize=False``, mask-removed) outputs; ``reuse``: write into
        the buffer of the previous full evaluation, which nothing reads any more."""
        out = None
        if reuse and self.normalize and not self.is_log_probs:
            buffer = self._buffer
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
                output.shape,
                output.dtype,
                output.device,
            ):
                self._buffer = None  # free the old one before allocating
                self._buffer = output.new_empty(output.shape)
            out = self._buffer
        return denoiser_log_probs(
            output, self.denoiser.mask_id, self.is_log_probs, normalize=self.normalize, out=out
        )

    def adopt(self, x_t: Tensor, log_probs: Tensor) -> Tensor:
        """Make ``log_probs`` the cached log-probabilities of ``x_t`` (rows rebuilt elsewhere)."""
        self.x, self.log_probs = x_t, log_probs
        return log_probs
