"""Document-level train/val split and packing of token streams into fixed-length rows.

The split happens on whole documents *before* tokenization, so no text of a validation
document can reach training (the corpora deduplicate exact repeats first, so a repeated
document cannot sit on both sides either). Packing follows MDLM's ``wrap`` mode: each
document's ids are followed by ``eos_id``, the documents of a split are concatenated, and the
stream is cut into rows of ``seq_len``; the ragged tail is dropped. Rows therefore cross
document boundaries, but never split boundaries.

Example::

    train_idx, val_idx = split_indices(len(docs), val_fraction=0.05, seed=0)
    rows = pack([[5, 6, 7], [8, 9]], eos_id=0, seq_len=4)   # [[5, 6, 7, 0]], tail [8, 9, 0] dropped
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


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
