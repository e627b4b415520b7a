"""Evaluation metrics selected by name, as ``torchmetrics`` metrics that reduce across processes.

``MetricSet(names, ...)`` builds the named metrics of one method; ``update(result)`` adds a
batch of answers (a ``evaluation.MethodResult``, or anything with the attributes of
``SampleBatch``); ``compute()`` returns ``{key: float}``. The ``RewardEvaluation`` callback
(``metrics=[...]``) and ``python -m lightning_smc.sample`` (``--metrics a,b,...``) use it.

===========  ===============================  ===============================================
name         keys                             value
===========  ===============================  ===============================================
reward       ``reward``                       mean steering reward
success      ``success``                      fraction with reward > ``success_threshold``
holdout      ``holdout``                      mean holdout reward (a different scorer)
gen_ppl      ``gen_ppl``                      token-weighted generative perplexity of the
                                              texts under a causal LM (``gen_ppl_model``)
entropy      ``entropy``                      mean per-sample unigram entropy of the token
                                              ids (nats)
dist         ``dist_1``, ``dist_2``,          Dist-n of the texts (distinct / total n-grams,
             ``dist_3``                       whitespace words, pooled over the set)
ess          ``ess``                          mean over samples and steps of ESS / N
log_z        ``log_z_mean``, ``log_z_var``    mean and unbiased variance of ``log Ẑ`` across
                                              samples (seeds; the variance needs >= 2 samples)
resamples    ``resamples``                    resampling events per sample (mean)
overtakes    ``overtakes``,                   overtakes per sample (mean), and overtakes per
             ``overtake_rate``                resample (omitted when nothing was resampled)
nfe          ``nfe``, ``nfe_answer``          network evaluations per particle sequence, and
                                              per answer (``N`` times as many)
seconds      ``seconds``                      sampling wall time per answer (summed over
                                              processes: compute time, not latency)
===========  ===============================  ===============================================

Standard errors: ``reward``, ``success``, ``holdout``, ``entropy``, ``ess`` and ``seconds`` also
give ``<key>_se`` (sample standard deviation / sqrt(n) over samples); ``gen_ppl_se`` is the
delta-method error of the token-weighted ratio (``sample_metrics.ratio_with_se``). Each needs
>= 2 samples. ``dist_n`` is a pooled statistic and has none here.

Default (``names=None``): every metric but ``gen_ppl``, ``entropy`` and ``dist``, minus
``reward`` / ``success`` / ``holdout`` when there is no such scorer. A name given explicitly
whose scorer is missing is an error; so is an unknown name (``unknown metric 'x'; choose from
...``). ``gen_ppl``'s scorer is loaded when the set is built, so a missing model fails before
any sampling, with the metric and the path in the message; it is loaded once per process
(``load_scorer``'s cache) and reused by every set and every evaluation.

Undefined values are left out, never invented: ``log_z_var`` with one sample,
``overtake_rate`` without any resample, ``dist_n`` when no answer has ``n`` words and
``gen_ppl`` when every text is empty (the last two with a warning).

**Distributed reduction.** The per-sample metrics keep one row per sample, keyed by its
*global* index (``result.index``), in ``cat`` states; ``compute()`` gathers the rows of every
process (torchmetrics' sync), orders them by index and reduces them in that fixed order, so a
sharded evaluation gives bit-for-bit the numbers of a single process; a sample index seen twice
is an error. ``dist`` gathers distinct n-grams (a union, not a sum). With
``sync=False`` nothing is gathered (the set describes this process's samples only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .perplexity import SMOLLM2, check_scorer, load_scorer
from .sample_metrics import METRICS, EvalMetric, SampleBatch, success_threshold_of

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "EvalMetric",
    "MetricSet",
    "SampleBatch",
    "parse_metric_names",
    "success_threshold_of",
]


DEFAULT_METRICS = (
    "reward",
    "success",
    "holdout",
    "ess",
    "log_z",
    "resamples",
    "overtakes",
    "nfe",
    "seconds",
)
"""``names=None``: these, minus those whose scorer is missing."""

_FIX = {
    "reward": "give a reward (reward: class_path/init_args)",
    "holdout": "give a holdout scorer (holdout: class_path/init_args)",
    "success_threshold": "give success_threshold, or a reward with a success_threshold",
}


def parse_metric_names(names: str | Iterable[str]) -> list[str]:
    """Metric names from ``"a,b"`` or a list; unknown or repeated names are errors."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = list(names)
    if not names or any(not n for n in names):
        raise ValueError(f"metrics: empty metric name in {names}; choose from {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"metrics: {repeated} named more than once")
    return names


class MetricSet:
    """The named metrics of one method (see the module docstring).

    Args:
        names: metric names (a list or ``"a,b"``); ``None``: ``DEFAULT_METRICS`` minus those
            whose scorer is missing.
        reward, holdout: whether the batches carry reward / holdout scores.
        success_threshold: ``success`` is ``reward > success_threshold`` (reward units; see
            ``success_threshold_of``).
        gen_ppl_model, gen_ppl_batch_size: the causal LM scorer of ``gen_ppl`` (``"smollm2"``, a
            ``.gguf`` file, a ``save_pretrained`` directory or a hub name) and its batch size.
        device: where the states live and the scorer runs (under NCCL: this rank's GPU).
        sync: reduce across processes at ``compute()`` (when a process group exists).
        defaults: the names used when ``names`` is ``None`` (those whose scorer is missing are
            left out).
    """

    def __init__(
        self,
        names: str | Iterable[str] | None = None,
        *,
        reward: bool = False,
        holdout: bool = False,
        success_threshold: float | None = None,
        gen_ppl_model: str = SMOLLM2,
        gen_ppl_batch_size: int = 8,
        device: str | torch.device = "cpu",
        sync: bool = True,
        defaults: Sequence[str] = DEFAULT_METRICS,
    ) -> None:
        available = {
            "reward": reward,
            "holdout": holdout,
            "success_threshold": reward and success_threshold is not None,
        }
        if names is None:
            self.names = [
                n
                for n in parse_metric_names(defaults)
                if all(available[r] for r in METRICS[n].requires)
            ]
        else:
            self.names = parse_metric_names(names)
            for name in self.names:
                for need in METRICS[name].requires:
                    if not available[need]:
                        raise ValueError(f"metric {name!r} needs a {need}: {_FIX[need]}")
        context = {
            "success_threshold": success_threshold,
            "gen_ppl_model": str(gen_ppl_model),
            "gen_ppl_batch_size": gen_ppl_batch_size,
            "device": torch.device(device),
        }
        if "gen_ppl" in self.names:
            _load_scorer_for_metric(str(gen_ppl_model), device)
        kwargs = {} if sync else {"sync_on_compute": False}
        self.metrics: dict[str, EvalMetric] = {
            name: METRICS[name](context, **kwargs).to(device) for name in self.names
        }

    def update(self, batch: SampleBatch) -> None:
        """Add a batch of answers (a ``MethodResult``) to every metric."""
        for metric in self.metrics.values():
            metric.update_from(batch)

    def compute(self) -> dict[str, float]:
        """``{key: float}`` of every metric, reduced across processes (every rank must call it,
        in the same order)."""
        out: dict[str, float] = {}
        for metric in self.metrics.values():
            out.update(metric.compute())
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def to(self, device: str | torch.device) -> MetricSet:
        for metric in self.metrics.values():
            metric.to(device)
        return self


def _load_scorer_for_metric(model: str, device: str | torch.device) -> None:
    """Load ``gen_ppl``'s scorer now (once per process), with the metric named on failure."""
    try:
        check_scorer(model)
        load_scorer(model, device)
    except (OSError, ImportError, ValueError) as err:
        raise OSError(
            f"metric 'gen_ppl': cannot load the perplexity scorer {model!r} ({err}); pass "
            "gen_ppl_model / --gen-ppl-model: 'smollm2', a .gguf file or a causal LM directory"
        ) from err
