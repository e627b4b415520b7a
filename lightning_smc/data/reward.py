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

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.tokenizer import TokenizerSpec, encode_documents
from ..rewards.text import TextReward, VaderSentiment, resolve_tokenizer
from .base import TokenizedDataModule
from .packing import pack, token_dtype

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


class RewardDataModule(TokenizedDataModule):
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

    consumer = "reward"  # its embedding table must match the tokenizer exactly

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
        super().__init__(
            corpus, tokenizer, seq_len, batch_size, val_fraction, seed, num_workers, max_documents
        )
        self.save_hyperparameters(ignore=["scorer"])
        self.scorer = scorer
        self.cache_dir = cache_dir

    # ---- tokenizer and scorer -------------------------------------------------------------
    def _load_spec(self) -> TokenizerSpec:
        """The base model's tokenizer (``"embedded"``, a directory, a spec or an object)."""
        return resolve_tokenizer(self.tokenizer_name)

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
            try:
                with np.load(cache) as arrays:  # arrays only: never unpickles
                    self.train_set = LabelledChunks(arrays["train_rows"], arrays["train_scores"])
                    self.val_set = LabelledChunks(arrays["val_rows"], arrays["val_scores"])
            except Exception as err:  # truncated, corrupted, or a missing array
                raise ValueError(
                    f"label cache {cache} is unreadable ({err}); delete it to relabel"
                ) from None
        else:
            documents, train_idx, val_idx = self._documents()
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
        self._check_train_rows()

    def _label(self, documents: Sequence[str], indices: list[int], name: str, scorer):
        texts = [documents[i] for i in indices]
        ids = encode_documents(self.tokenizer, texts)
        rows = pack(ids, self.eos_id, self.seq_len, dtype=token_dtype(self.vocab_size))
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
