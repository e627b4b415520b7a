"""Diversity of samples: unigram entropy (MDLM, SR-SMC) and Dist-n.

**Unigram entropy** of one sequence is the entropy, in nats, of the empirical distribution of
its token ids: with ``c_v`` the count of id ``v`` among the sequence's ``L`` tokens,
``H = -sum_v (c_v / L) log(c_v / L)``. It is computed per sample and reported as the mean
over samples (MDLM / SR-SMC). A repetitive, collapsed sample scores low: ``[1, 1, 2, 2]`` has
``log 2``, a constant sequence ``0``.

**Dist-n** of a *set* of samples is the number of distinct n-grams divided by the total number
of n-grams, pooled over all samples; n-grams never cross a sample boundary. A text is split
into **whitespace tokens** (``str.split()``: no lowercasing, punctuation stays attached to its
word); a sequence of token ids (list or tensor) is used as is. Dist-1/2/3 are the usual
choices.

Inputs, for both: one sample (a string, a 1-D tensor or a list of ids) or several (a list of
strings, a list of id lists / word lists, or a ``[B, L]`` tensor). ``ignore_ids`` removes ids
(pad, mask, EOS, ...) from id sequences before counting; the tokens around a removed id become
neighbours.

Empty samples: the per-sample function ``unigram_entropy`` raises ``ValueError`` on an empty
sequence; the ``UnigramEntropy`` metric skips it (``num_skipped`` counts it). ``distinct_n`` and
``DistinctN.compute()`` raise ``ValueError`` when there is no n-gram at all. NaN is never
produced.

Distributed evaluation: ``UnigramEntropy`` keeps sums and counts (reduced by sum).
``DistinctN`` keeps the *distinct n-gram rows* of each update (a ``cat`` state) and a total
count (sum), so distinct n-grams are counted over the union of all processes, not summed.
Words are mapped to 64-bit ids with a unkeyed BLAKE2b hash, identical in every process
(Python's ``hash`` is salted per process and would not be).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["DistinctN", "UnigramEntropy", "distinct_n", "unigram_entropy"]

Samples = str | Tensor | Sequence[Any]


def unigram_entropy(token_ids: Tensor | Sequence[Any], ignore_ids: Iterable[int] = ()) -> float:
    """Entropy in nats of the empirical token distribution of one sequence.

    ``token_ids`` is a 1-D tensor, a sequence of hashable tokens (ids or words) or a text (split
    on whitespace). Raises ``ValueError`` for an empty sequence (after dropping ``ignore_ids``).
    """
    if isinstance(token_ids, str):
        token_ids = token_ids.split()
    if isinstance(token_ids, Tensor):
        if token_ids.dim() != 1:
            raise ValueError(
                f"unigram_entropy takes one sequence (1-D), got shape {tuple(token_ids.shape)}; "
                "use UnigramEntropy for a batch"
            )
        counts = torch.unique(_drop(token_ids, ignore_ids), return_counts=True)[1]
    else:
        ignored = set(ignore_ids)
        counts = torch.tensor(list(Counter(t for t in token_ids if t not in ignored).values()))
    return _entropy(counts)


def _entropy(counts: Tensor) -> float:
    total = counts.sum()
    if total == 0:
        raise ValueError("unigram_entropy of an empty sequence is undefined")
    p = counts.double() / total
    return float(-(p * p.log()).sum()) + 0.0  # + 0.0: a constant sequence gives 0.0, not -0.0


def _drop(ids: Tensor, ignore_ids: Iterable[int]) -> Tensor:
    ignore = torch.as_tensor(list(ignore_ids), dtype=ids.dtype, device=ids.device)
    return ids[~torch.isin(ids, ignore)] if ignore.numel() else ids


@lru_cache(maxsize=1 << 18)
def _word_id(word: str) -> int:
    """A 64-bit id of ``word``, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _sequences(samples: Samples, ignore_ids: Iterable[int] = ()) -> list[Tensor]:
    """Each sample as a 1-D int64 tensor: ids as given, words as ``_word_id`` hashes."""
    ignore_ids = list(ignore_ids)

    def one(sample: Any) -> Tensor:
        if isinstance(sample, str):
            return torch.tensor([_word_id(w) for w in sample.split()], dtype=torch.long)
        if isinstance(sample, Tensor):
            if sample.dim() != 1:
                raise ValueError(f"a sample must be 1-D, got shape {tuple(sample.shape)}")
            return _drop(sample.long().cpu(), ignore_ids)
        items = list(sample)
        if items and all(isinstance(t, str) for t in items):  # pre-split words
            return torch.tensor([_word_id(w) for w in items], dtype=torch.long)
        return _drop(torch.tensor(items, dtype=torch.long), ignore_ids)

    if isinstance(samples, str):
        return [one(samples)]
    if isinstance(samples, Tensor):
        if samples.dim() == 1:
            return [one(samples)]
        if samples.dim() == 2:
            return [one(row) for row in samples]
        raise ValueError(f"expected a [L] or [B, L] tensor, got shape {tuple(samples.shape)}")
    samples = list(samples)
    if samples and all(isinstance(s, int) for s in samples):  # a single id sequence
        return [one(samples)]
    return [one(s) for s in samples]


def _ngrams(sequences: list[Tensor], n: int) -> Tensor:
    """All n-grams of the sequences as rows of an int64 ``[count, n]`` tensor."""
    rows = [s.unfold(0, n, 1) for s in sequences if s.numel() >= n]
    return torch.cat(rows) if rows else torch.empty(0, n, dtype=torch.long)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")


def distinct_n(samples: Samples, n: int, ignore_ids: Iterable[int] = ()) -> float:
    """Dist-n of a set of samples: distinct n-grams / total n-grams, pooled over the set.

    Texts are split on whitespace; id sequences are used as is (see module docstring).
    Raises ``ValueError`` when the samples hold no n-gram.
    """
    _check_n(n)
    grams = _ngrams(_sequences(samples, ignore_ids), n)
    if len(grams) == 0:
        raise ValueError(f"distinct_n: the samples hold no {n}-gram")
    return torch.unique(grams, dim=0).shape[0] / grams.shape[0]


class UnigramEntropy(Metric):
    """Mean over samples of the per-sample unigram entropy (nats), as MDLM / SR-SMC report.

    ``update(samples)`` takes a ``[B, L]`` id tensor, a list of id sequences or a list of texts
    (whitespace tokens). Empty samples are skipped and counted in ``num_skipped``.

    Args:
        ignore_ids: ids removed before counting (e.g. pad, mask).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    entropy_sum: Tensor
    num_samples: Tensor
    num_skipped: Tensor

    def __init__(self, ignore_ids: Iterable[int] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_ids = list(ignore_ids)
        self.add_state("entropy_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Samples) -> None:
        """Add the entropies of ``samples``."""
        total, scored, skipped = 0.0, 0, 0
        for seq in _sequences(samples, self.ignore_ids):
            if seq.numel() == 0:
                skipped += 1
                continue
            total += _entropy(torch.unique(seq, return_counts=True)[1])
            scored += 1
        self.entropy_sum += total
        self.num_samples += scored
        self.num_skipped += skipped

    def compute(self) -> Tensor:
        """Mean entropy over scored samples, float64; ``ValueError`` if there was none."""
        if int(self.num_samples) == 0:
            raise ValueError("UnigramEntropy: no non-empty sample was given to update()")
        return self.entropy_sum / self.num_samples


class DistinctN(Metric):
    """Dist-n over every sample given to ``update`` (in every process, under DDP).

    Args:
        n: n-gram order (1, 2, 3 are the usual).
        ignore_ids: ids removed from id sequences before forming n-grams.
        **kwargs: passed to ``torchmetrics.Metric``.

    States: ``ngrams`` (distinct n-gram rows of each update, int64 ``[k, n]``, reduced by
    concatenation) and ``num_ngrams`` (total n-grams, reduced by sum).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    ngrams: list[Tensor]
    num_ngrams: Tensor

    def __init__(self, n: int, ignore_ids: Iterable[int] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_n(n)
        self.n = n
        self.ignore_ids = list(ignore_ids)
        self.add_state("ngrams", [], dist_reduce_fx="cat")
        self.add_state("num_ngrams", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Samples) -> None:
        """Add the n-grams of ``samples``."""
        grams = _ngrams(_sequences(samples, self.ignore_ids), self.n)
        self.ngrams.append(torch.unique(grams, dim=0).to(self.device))
        self.num_ngrams += grams.shape[0]

    def compute(self) -> Tensor:
        """Distinct / total n-grams, float64; ``ValueError`` if there was no n-gram."""
        if int(self.num_ngrams) == 0:
            raise ValueError(f"DistinctN: no {self.n}-gram was given to update()")
        distinct = torch.unique(dim_zero_cat(self.ngrams), dim=0).shape[0]
        return torch.tensor(distinct / int(self.num_ngrams), dtype=torch.float64)
