"""``SMCOutput``: particles, weights and diagnostics of one ``SMCSampler.sample`` call.

Shapes (``B`` prompts, ``N`` particles, ``L`` length, ``T`` steps):

- ``tokens [B, N, L]``; ``log_weights [B, N]`` float64, normalized (logsumexp over N is 0);
- ``log_normalizer [B]``: ``log Ẑ``, an unbiased estimate (``E[Ẑ] = Z``) of the target's normalizer;
- ``ess [B, T]``: ESS of the weights after step ``k`` (before any resample that follows it);
- ``resampled [B, T]`` and ``ancestors [B, T, N]``: whether a resample followed step ``k`` and
  which particle each slot came from (the identity where none did);
- ``nfe``: network evaluations per particle sequence (all networks; with the cache only the
  rows actually evaluated count, so it can be fractional);
- ``overtakes [B]``: resamples at which the final best particle's ancestor was not the
  best particle of that moment (SR-SMC's "overtake" events);
- ``log_confidence [B, N]`` float64: each particle's whole-trajectory log-confidence, the sum
  over all steps of the untempered ``log p_theta`` of the tokens its lineage committed (a
  resampled particle inherits its ancestor's sum; SR-SMC's answer rule, ``best_confidence``);
- ``steps``: the steps whose network was evaluated (fewer than planned when a ``threshold``
  block finished early or every row stopped at its end token);
- ``path``: with ``sample(..., record_path=True)`` an ``SMCPath`` of every transition (the
  rollouts the amortized proposal trains on), else ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SMCOutput", "SMCPath"]


@dataclass
class SMCPath:
    """Every transition ``x_t -> x_s`` of a run, per particle row (``R = B * N``, ``T`` steps).

    - ``x_from [T, R, L]``: the state step ``k`` moved from (after any resample before it);
    - ``x_to [T, R, L]``: the state it produced;
    - ``t [T]``: the (block-local) time of ``x_from``; ``step [T]``: the step index;
    - ``twist_from``, ``twist_to [T, R]`` float64: ``log gamma`` of ``x_from`` and of ``x_to``
      (zero without a twist; ``twist_to`` of the last step is the exact final twist).

    The committed positions of step ``k`` are ``(x_from[k] == mask_id) & (x_to[k] != mask_id)``.
    """

    x_from: Tensor
    x_to: Tensor
    t: Tensor
    step: Tensor
    twist_from: Tensor
    twist_to: Tensor

    def to(self, device) -> SMCPath:
        return SMCPath(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, steps: Tensor) -> SMCPath:
        """The transitions at step positions ``steps`` (indices into the first dimension)."""
        return SMCPath(*(getattr(self, f)[steps] for f in self.__dataclass_fields__))


@dataclass
class SMCOutput:
    tokens: Tensor
    log_weights: Tensor
    log_normalizer: Tensor
    ess: Tensor
    resampled: Tensor
    ancestors: Tensor
    nfe: float
    overtakes: Tensor
    path: SMCPath | None = None
    log_confidence: Tensor | None = None
    steps: int | None = None

    def best(self, score: Tensor | Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The highest-weight particle per prompt ``[B, L]``. ``score`` ``[B, N]`` (or a reward
        called on all ``B * N`` sequences) ranks by that instead: best-of-N."""
        if score is None:
            score = self.log_weights
        elif callable(score):
            B, N, L = self.tokens.shape
            score = score(self.tokens.reshape(B * N, L)).reshape(B, N)
        index = score.argmax(dim=-1)
        return self.tokens[torch.arange(self.tokens.shape[0], device=index.device), index]

    def best_confidence(self) -> Tensor:
        """The particle with the highest whole-trajectory log-confidence per prompt ``[B, L]``
        (SR-SMC's answer in its reference code)."""
        if self.log_confidence is None:
            raise ValueError(
                "this SMCOutput has no log_confidence (it was not made by SMCSampler.sample); "
                "rank by weight with best() instead"
            )
        return self.best(self.log_confidence)

    @property
    def weights(self) -> Tensor:
        """Normalized weights ``[B, N]``."""
        return self.log_weights.exp()

    def lineage(self, particle: Tensor) -> Tensor:
        """``[B, T]``: column ``k`` is the index, among the particles right after step ``k``, of
        the ancestor of final particle ``particle [B]`` (the last column is ``particle``)."""
        T = self.ancestors.shape[1]
        cols = [particle]
        for k in range(T - 2, -1, -1):
            cols.append(self.ancestors[:, k].gather(1, cols[-1].unsqueeze(1)).squeeze(1))
        return torch.stack(cols[::-1], dim=1)
