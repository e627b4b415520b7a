"""``CodeUsage``: how much of a VQ codebook a set of token grids uses.

Over all tokens seen, with ``n_k`` the count of code ``k`` and ``p_k = n_k / sum_j n_j``:

- ``usage = |{k : n_k > 0}| / K``: the fraction of the ``K`` codes used at least once;
- ``perplexity = exp(-sum_k p_k log p_k)``: the effective number of codes (``K`` when uniform).

Counts are summed across processes (DDP), so the result is the same as on one process.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["CodeUsage", "code_usage"]


def code_usage(counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(usage, perplexity)`` of code counts ``[K]`` (see the module docstring)."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("no tokens counted: update CodeUsage with at least one token grid")
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean(), entropy.exp()


class CodeUsage(Metric):
    """Accumulate code counts of token grids (any shape of ids in ``0..num_codes-1``);
    ``compute()`` returns ``{"usage", "perplexity"}``."""

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_codes < 1:
            raise ValueError(f"num_codes={num_codes} must be >= 1")
        self.num_codes = num_codes
        self.add_state("counts", torch.zeros(num_codes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, tokens: Tensor) -> None:
        ids = tokens.reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(f"token ids outside 0..{self.num_codes - 1}")
        self.counts += torch.bincount(ids, minlength=self.num_codes).to(self.counts)

    def compute(self) -> dict[str, Tensor]:
        usage, perplexity = code_usage(self.counts)
        return {"usage": usage, "perplexity": perplexity}
