"""Text-quality metrics for decoded samples; the aggregating ones are ``torchmetrics`` metrics.

``perplexity``  ``GenerativePerplexity``: token-weighted generative perplexity of texts under a
                causal LM (default: the embedded SmolLM2-135M-Instruct GGUF; ``"gpt2-large"``
                at scale), with ``sample_nll`` for per-text mean NLL; ``load_scorer`` /
                ``clear_scorer_cache`` manage the per-process scorer cache;
                ``smollm2_gguf_path`` locates the embedded GGUF file.
``diversity``   ``unigram_entropy`` (per sample, nats) and ``UnigramEntropy`` (mean over
                samples), as MDLM / SR-SMC report it; ``distinct_n`` and ``DistinctN`` (Dist-n:
                distinct / total n-grams pooled over the set, whitespace tokens for text).
``registry``    evaluation metrics by name (``reward``, ``success``, ``holdout``, ``gen_ppl``,
                ``entropy``, ``dist``, ``ess``, ``log_z``, ``resamples``, ``overtakes``, ``nfe``,
                ``seconds``): ``MetricSet(names, ...)`` updated with sampled answers, reduced
                across processes in sample-index order (bit-for-bit equal to one process).

Every metric reduces correctly across processes (DDP): sums and counts are reduced by sum, and
``DistinctN`` gathers the distinct n-grams of every process before counting them.
"""

from .diversity import DistinctN, UnigramEntropy, distinct_n, unigram_entropy
from .perplexity import (
    SMOLLM2,
    GenerativePerplexity,
    check_scorer,
    clear_scorer_cache,
    load_scorer,
    smollm2_gguf_path,
)
from .registry import (
    DEFAULT_METRICS,
    METRICS,
    EvalMetric,
    MetricSet,
    parse_metric_names,
    success_threshold_of,
)

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "SMOLLM2",
    "DistinctN",
    "EvalMetric",
    "GenerativePerplexity",
    "MetricSet",
    "UnigramEntropy",
    "check_scorer",
    "clear_scorer_cache",
    "distinct_n",
    "load_scorer",
    "parse_metric_names",
    "smollm2_gguf_path",
    "success_threshold_of",
    "unigram_entropy",
]
