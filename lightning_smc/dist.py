"""Small helpers for multi-process (``torch.distributed``) runs, usable with or without one.

Every helper works in a single process too (world size 1, rank 0, gathers return ``[obj]``),
so callers never branch on whether a process group exists.

- ``world_size()``, ``rank()``, ``local_rank()``, ``is_rank_zero()``: of the default process
  group when one is initialized (Lightning's DDP or ``init_from_env``), else 1 / 0.
- ``init_from_env(device)``: under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) create
  the default group with ``env://`` — ``nccl`` for a CUDA device, ``gloo`` otherwise; a no-op
  for a single process or when a group already exists. ``destroy()`` undoes it.
- ``shard_indices(n, world_size, rank)``: the items of ``range(n)`` one rank handles
  (contiguous blocks, or strided ``i % world_size == rank``); the shards of all ranks partition
  ``range(n)``, sizes differ by at most one, and a rank may get none when ``n < world_size``.
- ``all_gather_object(obj)``: every rank's ``obj`` (picklable), in rank order, on every rank.
- ``all_gather_tensor(tensor)``: every rank's tensor, in rank order; the first dimension may
  differ between ranks (the other dimensions, dtype and device must agree).
- ``on_rank_zero(compute)``: ``compute()`` run by rank zero only (a metric over gathered
  samples, a sandbox), its value returned on every rank; an error there is raised on every
  rank, so no rank waits for a value that never comes.
- ``barrier()``; ``free_port()``: a free TCP port on 127.0.0.1, for a local ``MASTER_PORT``.

Seeds of per-item randomness should be derived from global item indices
(``lightning_smc.derive_seed(seed, index)``), never from the rank, so that results do not
depend on how the items are sharded.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

__all__ = [
    "all_gather_object",
    "all_gather_tensor",
    "barrier",
    "destroy",
    "free_port",
    "init_from_env",
    "is_initialized",
    "is_rank_zero",
    "local_rank",
    "on_rank_zero",
    "process_group",
    "rank",
    "shard_indices",
    "world_size",
]

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """Whether a default process group exists in this process."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return tdist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's index on its machine: ``LOCAL_RANK`` (set by ``torchrun``), else 0."""
    return _env_int("LOCAL_RANK", 0)


def is_rank_zero() -> bool:
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_from_env(
    device: str | torch.device = "cpu",
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> bool:
    """Create the default process group from ``torchrun``'s environment when ``WORLD_SIZE > 1``.

    ``backend``: default ``"nccl"`` when ``device`` is CUDA (this process then uses GPU
    ``LOCAL_RANK``), else ``"gloo"``. Returns ``True`` when this call created the group (the
    caller should ``destroy()`` it), ``False`` for a single process or an existing group.
    Missing variables (``RANK``, ``MASTER_ADDR``, ...) are an error that names them."""
    if is_initialized() or _env_int("WORLD_SIZE", 1) <= 1:
        return False
    missing = [name for name in _ENV if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a distributed run, but {missing} "
            "are not set; launch with torchrun (python -m torch.distributed.run "
            "--nproc_per_node=K ...), which sets them"
        )
    device = torch.device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
    if timeout is not None:
        kwargs["timeout"] = timeout
    tdist.init_process_group(**kwargs)
    return True


@contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[None]:
    """``init_from_env(device)`` for the body; the group is destroyed after it only when this
    call created it (so nested uses and an existing group are left alone)."""
    created = init_from_env(device)
    try:
        yield
    finally:
        if created:
            destroy()


def destroy() -> None:
    """Destroy the default process group, if there is one."""
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def shard_indices(n: int, world_size: int = 1, rank: int = 0, contiguous: bool = True) -> list[int]:
    """Indices of ``range(n)`` handled by ``rank`` of ``world_size`` (see the module docstring):
    contiguous blocks (the first ``n % world_size`` ranks take one extra item) or, with
    ``contiguous=False``, every ``world_size``-th item starting at ``rank``."""
    if n < 0:
        raise ValueError(f"shard_indices: n={n} must be >= 0")
    if world_size < 1:
        raise ValueError(f"shard_indices: world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: rank={rank} must be in [0, world_size={world_size})")
    if not contiguous:
        return list(range(rank, n, world_size))
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return list(range(start, start + size + (rank < extra)))


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group).
    Tensors inside ``obj`` should be on the CPU (they are pickled)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` in rank order; the first dimension may differ between ranks."""
    if not is_initialized():
        return [tensor]
    tensor = tensor.contiguous()
    sizes: Sequence[torch.Tensor] = [
        torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())
    ]
    local = torch.tensor([tensor.shape[0] if tensor.dim() else 1], device=tensor.device)
    tdist.all_gather(list(sizes), local)
    if tensor.dim() == 0:
        out = [torch.empty_like(tensor) for _ in sizes]
        tdist.all_gather(out, tensor)
        return out
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in sizes]
    tdist.all_gather(out, padded)
    return [o[: int(s)] for o, s in zip(out, sizes, strict=True)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``MASTER_PORT`` of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_rank_zero(compute: Callable[[], T], what: str = "rank zero's step") -> T:
    """``compute()`` run by rank zero only, its value returned on every rank (a collective: every
    rank must call it). An error on rank zero is raised there and, as a ``RuntimeError`` naming
    ``what`` and the error, on the other ranks."""
    if world_size() == 1:
        return compute()
    value, error = None, None
    if is_rank_zero():
        try:
            value = compute()
        except Exception as err:  # re-raised below, after the other ranks heard of it
            error = err
    shared, failed = all_gather_object((value, None if error is None else repr(error)))[0]
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"{what} failed on rank zero: {failed}")
    return shared
