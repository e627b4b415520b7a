"""The evaluation metrics themselves, one ``torchmetrics.Metric`` per name (``METRICS``).

Each reads a batch of answers (``SampleBatch``: a ``evaluation.MethodResult`` or anything with
its attributes). Per-sample metrics keep one row per sample keyed by its global index, so a
sharded evaluation reduces to the single-process numbers; ``Dist`` gathers distinct n-grams.
The table of names, keys and values, the defaults and the distributed reduction are described
in ``metrics.registry``, which selects them by name (``MetricSet``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .diversity import _ngrams, _sequences, unigram_entropy
from .perplexity import GenerativePerplexity

__all__ = [
    "METRICS",
    "EvalMetric",
    "PerSampleMetric",
    "SampleBatch",
    "mean_with_se",
    "ratio_with_se",
    "success_threshold_of",
]


class SampleBatch(Protocol):
    """What the metrics read from a batch of answers (``evaluation.MethodResult`` has all of it):
    ``index [S]`` global sample indices; ``tokens [S, L]``; ``texts``; ``reward`` / ``holdout``
    ``[S]`` or ``None``; ``log_normalizer [S]``; ``ess_trace [S, T]`` (ESS after each step);
    ``resampled [S, T]``; ``overtakes [S]``; ``sample_nfe [S]`` (per particle sequence);
    ``sample_seconds [S]``; ``num_particles``."""

    index: Tensor
    tokens: Tensor
    texts: list[str]
    reward: Tensor | None
    holdout: Tensor | None
    log_normalizer: Tensor
    ess_trace: Tensor
    resampled: Tensor
    overtakes: Tensor
    sample_nfe: Tensor
    sample_seconds: Tensor
    num_particles: int


def success_threshold_of(reward: Any) -> float | None:
    """The success threshold of ``reward`` in *reward* units, or ``None`` if it has none.

    Text rewards keep ``success_threshold`` in the scorer's raw units and return ``scale *
    raw``; success (raw beyond the threshold in the direction of ``scale``) is then exactly
    ``reward > scale * success_threshold``, for either sign of ``scale``."""
    threshold = getattr(reward, "success_threshold", None)
    if threshold is None:
        return None
    return float(threshold) * float(getattr(reward, "scale", 1.0))


# ------------------------------------------------------------------------- standard errors
def mean_with_se(key: str, column: Tensor) -> dict[str, float]:
    """``{key: mean, key_se: std / sqrt(n)}`` of the per-sample values ``column [S]`` (the
    sample standard deviation, ``n - 1``; no ``key_se`` for a single sample)."""
    column = column.double()
    out = {key: float(column.mean())}
    if column.numel() >= 2:
        out[f"{key}_se"] = float(column.std(unbiased=True) / column.numel() ** 0.5)
    return out


def ratio_with_se(numerator: Tensor, denominator: Tensor) -> tuple[float, float | None]:
    """``m = sum(a) / sum(b)`` and its delta-method standard error
    ``sqrt(var(a_i - m b_i) / n) / mean(b)`` (a ratio estimator: token-weighted means); the
    error is ``None`` for a single sample."""
    a, b = numerator.double(), denominator.double()
    m = a.sum() / b.sum()
    if a.numel() < 2:
        return float(m), None
    se = (a - m * b).std(unbiased=True) / a.numel() ** 0.5 / b.mean()
    return float(m), float(se)


# ------------------------------------------------------------------------------------ metrics
class EvalMetric(Metric):
    """A named evaluation metric: ``update_from(batch)`` and ``compute() -> {key: float}``.

    Subclasses set ``name``, ``requires`` (scorers it needs: ``"reward"``, ``"holdout"``,
    ``"success_threshold"``) and implement ``update_from`` and ``compute``."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, context: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.context = context

    def update_from(self, batch: SampleBatch) -> None:
        raise NotImplementedError


class PerSampleMetric(EvalMetric):
    """One row of ``width`` float64 values per sample, keyed by the sample's global index.

    States ``index`` (int64) and ``values`` (float64 ``[S, width]``), both reduced by
    concatenation; ``rows()`` orders them by index after the sync. Subclasses implement
    ``values_of(batch) -> [S, width]`` and ``reduce(rows) -> {key: float}``."""

    width: ClassVar[int] = 1

    index: list[Tensor]
    values: list[Tensor]

    def __init__(self, context: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(context, **kwargs)
        self.add_state("index", [], dist_reduce_fx="cat")
        self.add_state("values", [], dist_reduce_fx="cat")

    def values_of(self, batch: SampleBatch) -> Tensor:
        raise NotImplementedError

    def update(self, index: Tensor, values: Tensor) -> None:
        """Add rows ``values [S, width]`` (or ``[S]`` when ``width`` is 1) of samples ``index [S]``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(index.shape[0], self.width)
        self.index.append(index.to(self.device))
        self.values.append(values.to(self.device))

    def update_from(self, batch: SampleBatch) -> None:
        self.update(batch.index, self.values_of(batch))

    def rows(self) -> Tensor:
        """All rows ``[S, width]`` (float64, CPU) in order of sample index."""
        if isinstance(self.index, list) and not self.index:  # a list until synced, then a tensor
            raise ValueError(f"metric {self.name!r}: no sample was given to update()")
        index = dim_zero_cat(self.index).long().cpu()
        values = dim_zero_cat(self.values).double().cpu().reshape(-1, self.width)
        if index.numel() == 0:
            raise ValueError(f"metric {self.name!r}: no sample was given to update()")
        order = torch.argsort(index, stable=True)
        index, values = index[order], values[order]
        repeated = index[1:][index[1:] == index[:-1]]
        if repeated.numel():
            raise ValueError(
                f"metric {self.name!r}: sample {int(repeated[0])} was added more than once "
                "(two processes evaluated the same sample, or update() was called twice)"
            )
        return values

    def compute(self) -> dict[str, float]:
        return self.reduce(self.rows())

    def reduce(self, rows: Tensor) -> dict[str, float]:
        raise NotImplementedError


def _required(batch: SampleBatch, field: str, metric: str) -> Tensor:
    value = getattr(batch, field)
    if value is None:
        raise ValueError(f"metric {metric!r} needs {field} scores; this batch has none")
    return value


class Reward(PerSampleMetric):
    name, requires = "reward", ("reward",)

    def values_of(self, batch):
        return _required(batch, "reward", self.name)

    def reduce(self, rows):
        return mean_with_se("reward", rows[:, 0])


class Success(PerSampleMetric):
    name, requires = "success", ("reward", "success_threshold")

    def values_of(self, batch):
        return _required(batch, "reward", self.name) > self.context["success_threshold"]

    def reduce(self, rows):
        return mean_with_se("success", rows[:, 0])


class Holdout(PerSampleMetric):
    name, requires = "holdout", ("holdout",)

    def values_of(self, batch):
        return _required(batch, "holdout", self.name)

    def reduce(self, rows):
        return mean_with_se("holdout", rows[:, 0])


class GenPPL(PerSampleMetric):
    """Rows ``(summed NLL, scored tokens)``; ``exp(sum NLL / sum tokens)`` (token-weighted)."""

    name, width = "gen_ppl", 2

    def __init__(self, context: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(context, **kwargs)
        # a plain attribute, not a submodule: it only scores (its own states stay unused)
        object.__setattr__(
            self,
            "scorer",
            GenerativePerplexity(
                context["gen_ppl_model"],
                batch_size=context["gen_ppl_batch_size"],
                device=context["device"],
            ),
        )

    def values_of(self, batch):
        nll, counts = self.scorer.score(list(batch.texts))
        return torch.stack([nll, counts.double()], dim=1)

    def reduce(self, rows):
        tokens = rows[:, 1].sum()
        if tokens == 0:
            warnings.warn(
                "metric 'gen_ppl': every answer's text is empty; gen_ppl left out", stacklevel=2
            )
            return {}
        nll, se = ratio_with_se(rows[:, 0], rows[:, 1])  # mean NLL per token
        out = {"gen_ppl": math.exp(nll)}
        if se is not None:  # delta method: d exp(m) = exp(m) dm
            out["gen_ppl_se"] = out["gen_ppl"] * se
        return out


class Entropy(PerSampleMetric):
    name = "entropy"

    def values_of(self, batch):
        return torch.tensor(
            [unigram_entropy(row) for row in batch.tokens.cpu()], dtype=torch.float64
        )

    def reduce(self, rows):
        return mean_with_se("entropy", rows[:, 0])


class ESS(PerSampleMetric):
    name = "ess"

    def values_of(self, batch):
        return batch.ess_trace.double().mean(-1) / batch.num_particles

    def reduce(self, rows):
        return mean_with_se("ess", rows[:, 0])


class LogZ(PerSampleMetric):
    name = "log_z"

    def values_of(self, batch):
        return batch.log_normalizer

    def reduce(self, rows):
        out = {"log_z_mean": float(rows[:, 0].mean())}
        if rows.shape[0] >= 2:
            out["log_z_var"] = float(rows[:, 0].var(unbiased=True))
        return out


class Resamples(PerSampleMetric):
    name = "resamples"

    def values_of(self, batch):
        return batch.resampled.double().sum(-1)

    def reduce(self, rows):
        return {"resamples": float(rows[:, 0].mean())}


class Overtakes(PerSampleMetric):
    """Rows ``(overtakes, resamples)``: overtakes per sample and per resample."""

    name, width = "overtakes", 2

    def values_of(self, batch):
        return torch.stack(
            [batch.overtakes.double().cpu(), batch.resampled.double().sum(-1).cpu()], dim=1
        )

    def reduce(self, rows):
        out = {"overtakes": float(rows[:, 0].mean())}
        resamples = rows[:, 1].sum()
        if resamples > 0:
            out["overtake_rate"] = float(rows[:, 0].sum() / resamples)
        return out


class NFE(PerSampleMetric):
    name, width = "nfe", 2

    def values_of(self, batch):
        nfe = batch.sample_nfe.double().cpu()
        return torch.stack([nfe, nfe * batch.num_particles], dim=1)

    def reduce(self, rows):
        return {"nfe": float(rows[:, 0].mean()), "nfe_answer": float(rows[:, 1].mean())}


class Seconds(PerSampleMetric):
    name = "seconds"

    def values_of(self, batch):
        return batch.sample_seconds

    def reduce(self, rows):
        return mean_with_se("seconds", rows[:, 0])


class Dist(EvalMetric):
    """Dist-1/2/3 of the texts (whitespace words, as ``distinct_n``). The distinct n-grams of
    each order are a ``cat`` state (gathered across ranks, then de-duplicated: a union, not a
    sum) with the total n-gram counts (summed). An order with no n-gram at all is left out,
    with a warning."""

    name = "dist"
    orders: ClassVar[tuple[int, ...]] = (1, 2, 3)

    counts: Tensor

    def __init__(self, context: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(context, **kwargs)
        for n in self.orders:
            self.add_state(f"ngrams_{n}", [], dist_reduce_fx="cat")
        self.add_state(
            "counts", torch.zeros(len(self.orders), dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, texts: Sequence[str]) -> None:
        sequences = _sequences(list(texts))
        for k, n in enumerate(self.orders):
            grams = _ngrams(sequences, n)
            getattr(self, f"ngrams_{n}").append(torch.unique(grams, dim=0).to(self.device))
            self.counts[k] += grams.shape[0]

    def update_from(self, batch: SampleBatch) -> None:
        self.update(batch.texts)

    def compute(self) -> dict[str, float]:
        out = {}
        for k, n in enumerate(self.orders):
            total = int(self.counts[k])
            if total == 0:
                warnings.warn(
                    f"metric 'dist': the answers hold no {n}-gram; dist_{n} left out", stacklevel=2
                )
                continue
            grams = dim_zero_cat(getattr(self, f"ngrams_{n}")).reshape(-1, n)
            out[f"dist_{n}"] = torch.unique(grams, dim=0).shape[0] / total
        return out


METRICS: dict[str, type[EvalMetric]] = {
    cls.name: cls
    for cls in (
        Reward,
        Success,
        Holdout,
        GenPPL,
        Entropy,
        Dist,
        ESS,
        LogZ,
        Resamples,
        Overtakes,
        NFE,
        Seconds,
    )
}
"""Every metric by name."""
