"""``TokenizedDataModule``: what every tokenized data module here shares.

A corpus (``load_corpus``) split into train and val by whole documents (``split_indices``), a
tokenizer exposed as ``spec`` / ``tokenizer`` / ``vocab_size`` / ``mask_id`` / ``pad_id`` /
``eos_id`` (loaded on first use), fixed-length rows, the resumable ``(seed, epoch)``-shuffled
train loader and the in-order val loader, and ``check_compatible`` against a model's vocabulary.
Subclasses say how the tokenizer is obtained (``_load_spec``) and build ``train_set`` /
``val_set`` in ``setup``:

- ``TextDataModule`` (``text``): packed rows for pretraining a denoiser (its logits may cover
  more ids than the tokenizer: ``padded_vocab_ok``);
- ``RewardDataModule`` (``reward``): rows labelled by a scorer, for a learned reward (its
  embedding table must match the tokenizer exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ..models.tokenizer import TokenizerSpec, eos_id
from .corpora import load_corpus
from .packing import EpochShuffleSampler, ResumableDataLoader, split_indices

__all__ = ["TokenizedDataModule", "check_data_args"]


def check_data_args(
    seq_len: int, batch_size: int, val_fraction: float, num_workers: int, max_documents
) -> None:
    """``ValueError`` naming the first out-of-range argument shared by the data modules."""
    checks = [
        (seq_len >= 2, f"seq_len={seq_len} must be >= 2"),
        (batch_size >= 1, f"batch_size={batch_size} must be >= 1"),
        (0.0 < val_fraction < 1.0, f"val_fraction={val_fraction} must lie in (0, 1)"),
        (num_workers >= 0, f"num_workers={num_workers} must be >= 0"),
        (
            max_documents is None or max_documents >= 2,
            f"max_documents={max_documents} must be None or >= 2 (one train, one val document)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class TokenizedDataModule(L.LightningDataModule):
    """Shared state and loaders of the tokenized data modules (see the module docstring).

    Subclasses call ``super().__init__(corpus, tokenizer, seq_len, batch_size, val_fraction,
    seed, num_workers, max_documents)`` and implement ``_load_spec``.
    """

    #: a model whose vocabulary is *larger* than the tokenizer's is fine (padded logits)
    padded_vocab_ok: ClassVar[bool] = False
    #: what ``check_compatible`` calls the model in its messages
    consumer: ClassVar[str] = "model"

    def __init__(
        self,
        corpus: str,
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        val_fraction: float,
        seed: int,
        num_workers: int,
        max_documents: int | None,
    ) -> None:
        super().__init__()
        check_data_args(seq_len, batch_size, val_fraction, num_workers, max_documents)
        self.corpus, self.tokenizer_name = corpus, tokenizer
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.seed, self.num_workers, self.max_documents = seed, num_workers, max_documents
        self._spec: TokenizerSpec | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # ---- tokenizer ------------------------------------------------------------------------
    def _load_spec(self) -> TokenizerSpec:
        raise NotImplementedError

    def _tokenizer_label(self) -> str:
        """The tokenizer as error messages name it."""
        return repr(str(self.tokenizer_name))

    @property
    def spec(self) -> TokenizerSpec:
        """``(tokenizer, vocab_size, mask_id, pad_id)``, loaded on first use."""
        if self._spec is None:
            self._spec = self._load_spec()
        return self._spec

    @property
    def tokenizer(self):
        return self.spec.tokenizer

    @property
    def vocab_size(self) -> int:
        """Ids of the tokenizer's vocabulary, mask included."""
        return self.spec.vocab_size

    @property
    def mask_id(self) -> int:
        return self.spec.mask_id

    @property
    def pad_id(self) -> int:
        return self.spec.pad_id

    @property
    def eos_id(self) -> int:
        """The separator packed between documents."""
        return eos_id(self.tokenizer)

    # ---- data -----------------------------------------------------------------------------
    def _documents(self) -> tuple[Sequence[str], list[int], list[int]]:
        """The corpus and its seeded document-level ``(train, val)`` split."""
        documents = load_corpus(self.corpus, self.max_documents)
        try:
            train_idx, val_idx = split_indices(len(documents), self.val_fraction, self.seed)
        except ValueError as err:
            raise ValueError(f"corpus={self.corpus!r}: {err}") from None
        return documents, train_idx, val_idx

    def _check_train_rows(self) -> None:
        """At least one full training batch."""
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"corpus={self.corpus!r} packs into {len(self.train_set)} training rows of "
                f"seq_len={self.seq_len}, fewer than batch_size={self.batch_size}: use a larger "
                "corpus or max_documents, or a smaller batch_size or seq_len"
            )

    def train_dataloader(self) -> DataLoader:
        """Full batches in a ``(seed, epoch)``-seeded order, resumable mid-epoch
        (``packing.ResumableDataLoader``)."""
        dataset = self._require(self.train_set)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, seed=self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Every validation row, in order."""
        return DataLoader(
            self._require(self.val_set),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(dataset: Dataset | None) -> Dataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for data")
        return dataset

    def check_compatible(
        self, vocab_size: int, mask_id: int | None = None, max_len: int | None = None
    ) -> None:
        """Raise ``ValueError`` unless a model with this vocabulary (and ``max_len`` positions)
        can consume these rows."""
        if max_len is not None and self.seq_len > max_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the {self.consumer}'s {max_len} positions: "
                f"set seq_len <= {max_len}"
            )
        if self.padded_vocab_ok:
            vocab_ok = vocab_size >= self.vocab_size
        else:
            vocab_ok = vocab_size == self.vocab_size
        if not vocab_ok or (mask_id is not None and mask_id != self.mask_id):
            raise ValueError(
                f"{self.consumer} vocabulary mismatch: the tokenizer "
                f"{self._tokenizer_label()} has {self.vocab_size} ids "
                f"(mask_id={self.mask_id}) but the {self.consumer} was built with "
                f"vocab_size={vocab_size} (mask_id={mask_id}); build it with "
                f"vocab_size=datamodule.vocab_size and mask_id=datamodule.mask_id, or use the "
                f"{self.consumer}'s tokenizer"
            )
