"""Which particle rows move between processes after a global resample (pure index algebra).

Layout: ``W`` ranks share the ``N`` particles of each of ``B`` prompts. Rank ``r`` holds the
global slots ``r * n .. (r + 1) * n - 1`` (``n = N / W``) of every prompt as its local rows
``b * n + j``. After a resample, slot ``i`` of prompt ``b`` takes particle ``A[b, i]`` of the
same prompt (``A [B, N]``, the ancestors, identical on every rank). ``plan_exchange(A, W, r)``
tells rank ``r``:

- ``keep_to, keep_from``: its local rows whose ancestor is already on ``r``, and the local row
  of that ancestor (a local gather, no communication);
- ``send[p]``: the local rows that rank ``p`` needs from ``r``, each **once** however many of
  ``p``'s slots descend from it (ordered by prompt, then slot);
- ``recv_to[p], recv_pos[p]``: the local rows filled from rank ``p``'s message and, for each,
  the position of its ancestor in that message (``recv_count[p]`` rows long).

Every rank derives the same lists from the same ``A``, so messages carry no header, and only
particles whose ancestor lives on another rank travel. Entries for ``p == r`` are empty.

Example (``B = 1``, ``N = 4``, ``W = 2``; every slot descends from slot 2, which rank 1 holds)::

    >>> A = torch.tensor([[2, 2, 2, 2]])
    >>> ex = plan_exchange(A, world_size=2, rank=0)
    >>> ex.recv_to[1], ex.recv_pos[1], ex.recv_count[1]
    (tensor([0, 1]), tensor([0, 0]), 1)
    >>> plan_exchange(A, world_size=2, rank=1).send[0]  # rank 1's local row 0, sent once
    tensor([0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Exchange", "plan_exchange"]


@dataclass(frozen=True)
class Exchange:
    """Rank ``r``'s part of a global resample (see the module docstring)."""

    keep_to: Tensor
    keep_from: Tensor
    send: list[Tensor]
    recv_to: list[Tensor]
    recv_pos: list[Tensor]
    recv_count: list[int]

    @property
    def rows_sent(self) -> int:
        return sum(int(rows.numel()) for rows in self.send)

    @property
    def rows_received(self) -> int:
        return sum(self.recv_count)


def plan_exchange(ancestors: Tensor, world_size: int, rank: int) -> Exchange:
    """Rank ``rank``'s keeps, sends and receives for ancestors ``A [B, N]`` over ``world_size`` ranks."""
    B, N = ancestors.shape
    if not 0 <= rank < world_size or N % world_size:
        raise ValueError(f"cannot split {N} particles over rank {rank} of {world_size}")
    n = N // world_size
    prompt = torch.arange(B, device=ancestors.device).unsqueeze(1)
    # a particle (b, a) as one sortable key b * N + a, and as the local row of its owner a // n
    key = prompt * N + ancestors  # [B, N]
    owner = ancestors // n

    def local_row(k: Tensor) -> Tensor:
        return (k // N) * n + (k % N) % n

    mine = key[:, rank * n : (rank + 1) * n].reshape(-1)  # ancestors of my local rows
    mine_owner = owner[:, rank * n : (rank + 1) * n].reshape(-1)
    rows = torch.arange(mine.numel(), device=ancestors.device)
    send, recv_to, recv_pos = ([rows[:0]] * world_size for _ in range(3))  # empty for p == rank
    recv_count = [0] * world_size
    for p in range(world_size):
        if p == rank:
            continue
        wanted = mine_owner == p
        needed = torch.unique(mine[wanted])  # sorted keys: the order rank p sends in
        recv_to[p], recv_pos[p] = rows[wanted], torch.searchsorted(needed, mine[wanted])
        recv_count[p] = int(needed.numel())
        theirs = key[:, p * n : (p + 1) * n]
        asked = torch.unique(theirs[owner[:, p * n : (p + 1) * n] == rank])  # the same keys
        send[p] = local_row(asked)
    keep = mine_owner == rank
    return Exchange(rows[keep], local_row(mine[keep]), send, recv_to, recv_pos, recv_count)
