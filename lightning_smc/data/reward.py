"""``RewardDataModule``: corpus chunks labelled by a text scorer, to train a ``LearnedReward``.

Pipeline: ``load_corpus`` (documents) -> ``split_indices`` (whole documents to train or val,
seeded; the same split as ``TextDataModule`` for the same ``val_fraction`` and ``seed``, so
the embedded base model's validation works stay held out here too) -> the *base model's*
tokenizer (``"embedded"`` by default: a learned reward must share the denoiser's vocabulary)
-> ``pack`` each split separately (documents joined by EOS, cut into ``seq_len`` rows, as
the denoiser was trained) -> every row decoded and scored once by ``scorer`` (a
``TextReward``, default ``VaderSentiment``; its output including ``scale``).

Labels are cached in ``cache_dir`` (``.npz`` keyed by a hash of the corpus, the tokenizer,
``seq_len``, the split and the scorer's settings), so refits and the validation loop never
re-score. Batches are dicts ``{"input_ids": LongTensor[B, seq_len], "score": float32[B]}``.

Example::

    dm = RewardDataModule("shakespeare", tokenizer="embedded", seq_len=64, batch_size=64)
    dm.setup()
    dm.vocab_size, dm.mask_id        # 4096, 4095
    dm.train_scores.mean()           # mean VADER compound of the training rows
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..models.tokenizer import TokenizerSpec, encode_documents, eos_id
from ..rewards.text import TextReward, VaderSentiment, resolve_tokenizer
from .corpora import load_corpus
from .packing import (
    EpochShuffleSampler,
    ResumableDataLoader,
    pack,
    split_indices,
    token_dtype,
)

__all__ = ["LabelledChunks", "RewardDataModule"]


class LabelledChunks(Dataset):
    """Token rows and their scores; item ``i`` is ``{"input_ids": [L] long, "score": float32}``."""

    def __init__(self, rows: np.ndarray, scores: np.ndarray) -> None:
        if len(rows) != len(scores):
            raise ValueError(f"{len(rows)} rows but {len(scores)} scores")
        self.rows, self.scores = rows, scores.astype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.rows[index].astype(np.int64)),
            "score": torch.tensor(self.scores[index]),
        }


class RewardDataModule(L.LightningDataModule):
    """Chunks of a corpus in the base model's tokens, labelled by a text scorer.

    Args:
        corpus: ``"shakespeare"``, ``"fortunes"``, ``"hf:NAME"`` or a path (``load_corpus``).
        tokenizer: the base model's tokenizer: ``"embedded"`` (``assets/mdlm_tiny``) or a
            checkpoint / tokenizer directory.
        scorer: the ``TextReward`` whose scores are learned (``None``: ``VaderSentiment()``);
            it is bound to ``tokenizer``.
        seq_len: tokens per row (>= 2).
        batch_size: rows per batch (>= 1).
        val_fraction: fraction of *documents* held out for validation, in (0, 1).
        seed: seed of the document split and of the training shuffle.
        num_workers: DataLoader worker processes.
        max_documents: keep only the first documents of the corpus (tests, smoke runs).
        cache_dir: where labels are cached (``None``: no cache).
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        tokenizer: str = "embedded",
        scorer: TextReward | None = None,
        seq_len: int = 64,
        batch_size: int = 64,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        max_documents: int | None = None,
        cache_dir: str | None = "outputs/reward_labels",
    ) -> None:
        super().__init__()
        checks = [
            (seq_len >= 2, f"seq_len={seq_len} must be >= 2"),
            (batch_size >= 1, f"batch_size={batch_size} must be >= 1"),
            (0.0 < val_fraction < 1.0, f"val_fraction={val_fraction} must lie in (0, 1)"),
            (num_workers >= 0, f"num_workers={num_workers} must be >= 0"),
            (
                max_documents is None or max_documents >= 2,
                f"max_documents={max_documents} must be None or >= 2 (one train, one val)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.save_hyperparameters(ignore=["scorer"])
        self.corpus, self.tokenizer_name = corpus, tokenizer
        self.scorer = scorer
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.seed, self.num_workers, self.max_documents = seed, num_workers, max_documents
        self.cache_dir = cache_dir
        self._spec: TokenizerSpec | None = None
        self.train_set: LabelledChunks | None = None
        self.val_set: LabelledChunks | None = None

    # ---- tokenizer and scorer -------------------------------------------------------------
    @property
    def spec(self) -> TokenizerSpec:
        """``(tokenizer, vocab_size, mask_id, pad_id)`` of the base model."""
        if self._spec is None:
            self._spec = resolve_tokenizer(self.tokenizer_name)
        return self._spec

    @property
    def tokenizer(self):
        return self.spec.tokenizer

    @property
    def vocab_size(self) -> int:
        """Ids of the base model's vocabulary, mask included: the reward's ``vocab_size``."""
        return self.spec.vocab_size

    @property
    def mask_id(self) -> int:
        return self.spec.mask_id

    def _scorer(self):
        if self.scorer is None:
            self.scorer = VaderSentiment()
        if not isinstance(self.scorer, TextReward):
            raise TypeError(
                f"scorer={type(self.scorer).__name__} must be a TextReward (it decodes the rows)"
            )
        if getattr(self.scorer, "spec", None) is None:
            self.scorer.bind_tokenizer(self.spec)
        return self.scorer

    # ---- data -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Split, tokenize, pack and label both splits (once; labels cached on disk)."""
        if self.train_set is not None:
            return
        scorer = self._scorer()
        cache = self._cache_path(scorer)
        if cache is not None and cache.is_file():
            arrays = np.load(cache)
            self.train_set = LabelledChunks(arrays["train_rows"], arrays["train_scores"])
            self.val_set = LabelledChunks(arrays["val_rows"], arrays["val_scores"])
        else:
            documents = load_corpus(self.corpus, self.max_documents)
            try:
                train_idx, val_idx = split_indices(len(documents), self.val_fraction, self.seed)
            except ValueError as err:
                raise ValueError(f"corpus={self.corpus!r}: {err}") from None
            self.train_set = self._label(documents, train_idx, "train", scorer)
            self.val_set = self._label(documents, val_idx, "val", scorer)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(
                    tmp,
                    train_rows=self.train_set.rows,
                    train_scores=self.train_set.scores,
                    val_rows=self.val_set.rows,
                    val_scores=self.val_set.scores,
                )
                tmp.replace(cache)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"corpus={self.corpus!r} gives {len(self.train_set)} training rows of "
                f"seq_len={self.seq_len}, fewer than batch_size={self.batch_size}: use a larger "
                "corpus or max_documents, or a smaller batch_size or seq_len"
            )

    def _label(self, documents: Sequence[str], indices: list[int], name: str, scorer):
        texts = [documents[i] for i in indices]
        ids = encode_documents(self.tokenizer, texts)
        rows = pack(ids, eos_id(self.tokenizer), self.seq_len, dtype=token_dtype(self.vocab_size))
        if len(rows) == 0:
            raise ValueError(
                f"corpus={self.corpus!r}: the {name} split ({len(indices)} documents) has fewer "
                f"than seq_len={self.seq_len} tokens: raise max_documents or val_fraction, or "
                "lower seq_len"
            )
        scores = []
        for start in range(0, len(rows), 1024):
            chunk = torch.from_numpy(rows[start : start + 1024].astype(np.int64))
            scores.append(scorer(chunk).numpy())
        return LabelledChunks(rows, np.concatenate(scores))

    def token_scores(self) -> np.ndarray:
        """Float32 ``[vocab_size]``: the scorer on each token's own text, minus its empty-text score.

        Special tokens (mask, pad, EOS, ...) get 0. A cheap per-token prior of the scorer (e.g.
        VADER's valence of " love"), which ``RewardModelModule(token_prior=...)`` writes into
        the reward's embedding before training.
        """
        scorer = self._scorer()
        ids = torch.arange(self.vocab_size).unsqueeze(1)
        scores = scorer(ids) - scorer(torch.full((1, 1), self.mask_id))  # mask decodes to ""
        special = list(set(self.tokenizer.all_special_ids) | {self.mask_id, self.spec.pad_id})
        scores[special] = 0.0
        return scores.numpy().astype(np.float32)

    def _cache_path(self, scorer) -> Path | None:
        if self.cache_dir is None:
            return None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        tokenizer_id = backend.to_str() if backend is not None else str(self.tokenizer_name)
        key = {
            "corpus": self.corpus,
            "max_documents": self.max_documents,
            "tokenizer": hashlib.sha1(tokenizer_id.encode()).hexdigest(),
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "scorer": scorer.cache_id(),
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return Path(self.cache_dir) / f"{getattr(scorer, 'name', 'scores')}-{digest}.npz"

    @property
    def train_scores(self) -> np.ndarray:
        return self._require(self.train_set).scores

    @property
    def val_scores(self) -> np.ndarray:
        return self._require(self.val_set).scores

    def train_dataloader(self) -> DataLoader:
        """Full batches in a ``(seed, epoch)``-seeded order, resumable mid-epoch (the same loader
        as the pretraining data, ``packing.ResumableDataLoader``)."""
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
    def _require(dataset: LabelledChunks | None) -> LabelledChunks:
        if dataset is None:
            raise RuntimeError("call setup() before asking for data")
        return dataset

    def check_compatible(self, vocab_size: int, mask_id: int | None = None) -> None:
        """Raise ``ValueError`` unless a reward with this vocabulary can read these tokens."""
        if vocab_size != self.vocab_size or (mask_id is not None and mask_id != self.mask_id):
            raise ValueError(
                f"reward vocabulary mismatch: the tokenizer {self.tokenizer_name!r} has "
                f"{self.vocab_size} ids (mask_id={self.mask_id}) but the reward was built with "
                f"vocab_size={vocab_size} (mask_id={mask_id}); set the reward's vocab_size to "
                "the base model's"
            )
