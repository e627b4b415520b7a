"""Explicit, reproducible randomness for batched SMC.

Every stochastic call takes a ``torch.Generator``. So that a prompt's particles do not depend
on which other prompts share its batch, or on which rank of a distributed job samples it,
the sampler keeps **one generator per prompt** (``RowGenerators``). Seeds are derived, never
drawn from global state:

- ``derive_seed(seed, *keys)``: a 63-bit seed from a global seed and integer keys
  (a SplitMix64 mix), e.g. ``derive_seed(global_seed, prompt_index)`` for evaluation, or
  ``derive_seed(global_seed, rank, step)`` for per-rank training rollouts. Keys are global
  indices, so sharding the same prompt set over any number of ranks gives the same streams.
- ``RowGenerators.from_seeds(seeds, device)``: one generator per row.
- ``RowGenerators.split(generator, rows)``: rows seeded from one user generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RowGenerators", "derive_seed", "rand_at"]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A seed in ``[0, 2**63)`` determined by ``seed`` and the integer ``keys``."""
    z = _splitmix64(int(seed) & _MASK64)
    for key in keys:
        z = _splitmix64(z ^ (int(key) & _MASK64))
    return z >> 1


class RowGenerators:
    """One ``torch.Generator`` per batch row; draws are concatenated along a new leading axis."""

    def __init__(self, generators: Sequence[torch.Generator]):
        if len(generators) == 0:
            raise ValueError("RowGenerators needs at least one generator")
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> RowGenerators:
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    @classmethod
    def split(
        cls, generator: torch.Generator | None, rows: int, device: torch.device | str = "cpu"
    ) -> RowGenerators:
        """Row ``b`` is seeded with ``derive_seed(s, b)``, ``s`` one draw from ``generator``."""
        base = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return cls.from_seeds([derive_seed(base, b) for b in range(rows)], device)

    def rand(self, shape: Sequence[int], device: torch.device | str, dtype=torch.float64) -> Tensor:
        """Uniforms ``[B, *shape]``, row ``b`` drawn from generator ``b``."""
        out = torch.empty((len(self), *shape), dtype=dtype, device=device)
        for b in range(len(self)):
            self.rand_row_into(b, out[b])
        return out

    def rand_row(
        self, b: int, shape: Sequence[int], device: torch.device | str, dtype=torch.float64
    ) -> Tensor:
        g = self.generators[b]
        return torch.rand(tuple(shape), generator=g, dtype=dtype, device=g.device).to(device)

    def rand_row_into(self, b: int, out: Tensor) -> Tensor:
        """Fill ``out`` with uniforms from generator ``b``: the same values, and the same generator
        state afterwards, as ``rand_row(b, out.shape, out.device, out.dtype)``."""
        g = self.generators[b]
        if out.device == g.device and out.is_contiguous():
            return torch.rand(out.shape, generator=g, dtype=out.dtype, device=g.device, out=out)
        return out.copy_(self.rand_row(b, out.shape, out.device, out.dtype))

    def generator(self, b: int) -> torch.Generator:
        return self.generators[b]


def rand_at(
    rows: RowGenerators, mask: Tensor, trailing: Sequence[int] = (), out: Tensor | None = None
) -> Tensor:
    """Uniforms ``[mask.sum(), *trailing]`` (float64) for the True entries of ``mask [B, ...]`` in
    row-major order (the order of ``mask.nonzero()``); row ``b``'s entries come from generator
    ``b`` and depend only on row ``b``'s mask. ``out``: an optional contiguous float64 buffer
    with at least that many elements to write into (the result is a view of it)."""
    counts = mask.reshape(mask.shape[0], -1).sum(-1).tolist()
    shape = (int(sum(counts)), *trailing)
    numel = math.prod(shape)
    if out is None:
        result = torch.empty(shape, dtype=torch.float64, device=mask.device)
    else:
        if out.dtype != torch.float64 or not out.is_contiguous() or out.numel() < numel:
            raise ValueError("rand_at: out must be a contiguous float64 buffer large enough")
        result = out.reshape(-1)[:numel].view(shape)
    start = 0
    for b, c in enumerate(counts):  # also for c == 0, exactly as separate draws would
        rows.rand_row_into(b, result[start : start + int(c)])
        start += int(c)
    return result
