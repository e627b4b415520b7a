"""Document-level train/val split and packing of token streams into fixed-length rows.

The split happens on whole documents *before* tokenization, so no text of a validation
document can reach training (the corpora deduplicate exact repeats first, so a repeated
document cannot sit on both sides either). Packing follows MDLM's ``wrap`` mode: each
document's ids are followed by ``eos_id``, the documents of a split are concatenated, and the
stream is cut into rows of ``seq_len``; the ragged tail is dropped. Rows therefore cross
document boundaries, but never split boundaries.

Training rows are served by ``ResumableDataLoader`` over an ``EpochShuffleSampler``: epoch ``e``
visits the rows in a permutation drawn from ``derive_seed(seed, e)`` (the same on every run), and
the loader's ``state_dict()`` (``{"epoch", "batches"}``), which Lightning stores in every
checkpoint, lets a resumed run continue with the very next batch of the interrupted epoch.

Example::

    train_idx, val_idx = split_indices(len(docs), val_fraction=0.05, seed=0)
    rows = pack([[5, 6, 7], [8, 9]], eos_id=0, seq_len=4)   # [[5, 6, 7, 0]], tail [8, 9, 0] dropped
    data = PackedSequences(rows)
    loader = ResumableDataLoader(data, batch_size=32, sampler=EpochShuffleSampler(data, seed=0))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..smc import derive_seed


def split_indices(
    num_documents: int, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Disjoint sorted document indices ``(train, val)``: a seeded permutation, >= 1 val doc."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    num_val = max(1, round(num_documents * val_fraction))
    if num_val >= num_documents:
        raise ValueError(
            f"the corpus has {num_documents} document(s): too few to hold out "
            f"val_fraction={val_fraction} and still train; use a larger corpus or "
            "max_documents, or a smaller val_fraction"
        )
    order = np.random.default_rng(seed).permutation(num_documents)
    return sorted(order[num_val:].tolist()), sorted(order[:num_val].tolist())


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type holding every id (uint16 for GPT-2-sized vocabularies)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def pack(
    token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int, dtype=np.int32
) -> np.ndarray:
    """``[num_rows, seq_len]`` array: documents joined by ``eos_id``, tail dropped."""
    pieces = [np.asarray([*ids, eos_id], dtype=dtype) for ids in token_lists]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    num_rows = len(stream) // seq_len
    return stream[: num_rows * seq_len].reshape(num_rows, seq_len)


class PackedSequences(Dataset):
    """Rows of a packed token array; item ``i`` is ``{"input_ids": LongTensor[seq_len]}``."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.rows[index].astype(np.int64))}

    @property
    def num_tokens(self) -> int:
        return int(self.rows.size)


class EpochShuffleSampler(DistributedSampler):
    """A seeded permutation per epoch, this rank's share of it, resumable mid-epoch.

    Epoch ``e`` visits the dataset in ``torch.randperm`` order under a generator seeded with
    ``derive_seed(seed, e)`` (``shuffle=False``: in order), identical on every run and rank;
    rank ``r`` of ``R`` takes positions ``r, r + R, ...`` (``drop_last=False`` pads with the
    first positions, as ``DistributedSampler``). Lightning calls ``set_epoch`` at each epoch
    start; being a ``DistributedSampler``, it is kept as is under DDP rather than replaced.
    ``num_replicas`` / ``rank`` default to the process group's, or ``1`` / ``0`` without one.
    ``skip(n)`` makes the next pass start after its first ``n`` indices (used on resume).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip = 0

    def skip(self, num_indices: int) -> None:
        """Leave out the first ``num_indices`` of this rank's share on the next pass only."""
        if num_indices < 0:
            raise ValueError(f"num_indices={num_indices} must be >= 0")
        self._skip = num_indices

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in visiting order (the whole share)."""
        size = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(size, generator=g).tolist()
        else:
            order = list(range(size))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - size
            order += (order * (pad // max(size, 1) + 1))[:pad]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        return iter(self.order(self.epoch)[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an ``EpochShuffleSampler`` that Lightning can checkpoint mid-epoch.

    It counts the batches it has served in the current pass; ``state_dict()`` returns
    ``{"epoch", "batches"}``, which Lightning saves with the fit loop (it calls ``state_dict`` /
    ``load_state_dict`` on every train loader that has them). After ``load_state_dict`` the
    next pass over the *same* epoch starts at batch ``batches`` (the sampler skips
    ``batches * batch_size`` indices, nothing is loaded twice); a pass over another epoch, or a
    finished epoch, starts from its first batch. Everything else is a plain ``DataLoader``;
    ``len()`` stays the full epoch, as Lightning's progress counters expect.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError(
                f"ResumableDataLoader needs sampler=EpochShuffleSampler(...), got "
                f"{type(self.sampler).__name__}"
            )
        self._served = 0
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, after Lightning's
        # ``set_epoch`` (so worker processes never prefetch with a stale epoch).
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == self.sampler.epoch:
            skip = resume["batches"] if resume["batches"] < len(self) else 0
        self.sampler.skip(skip * self.batch_size)
        self._served = skip
        for batch in super().__iter__():
            self._served += 1
            yield batch
