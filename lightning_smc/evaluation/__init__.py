"""Evaluation: running named methods over prompts, their results and reports (DESIGN §2).

=======================  =====================================================================
``run.py``               ``run_method(method, denoiser, tokenizer, prompts / num_samples,
                         reward=, holdout=, seq_len=, batch_size=, seed=, shard=)`` -> one
                         ``MethodResult``; ``evaluate_distributed`` (every rank samples its
                         shard, metrics reduced); ``run_config`` / ``evaluate_method`` for a
                         parsed method config file; ``read_prompts``
``result.py``            ``MethodResult``: answers, scores, ``log Ẑ``, weights, ESS traces;
                         ``merge`` (batches / shards in prompt order), ``summary`` (metrics)
=======================  =====================================================================

Layering: this package uses ``methods`` (the method vocabulary and its builder), the sampler,
rewards, metrics and models; nothing below it imports it. Example::

    from lightning_smc.evaluation import evaluate_method
    from lightning_smc.methods import load_method_config
    from lightning_smc.metrics import MetricSet

    config = load_method_config("configs/methods/embedded/srsmc.yaml")
    summary, result = evaluate_method(config, MetricSet(["reward", "ess", "log_z"]))
"""

from .result import MethodResult
from .run import evaluate_distributed, evaluate_method, read_prompts, run_config, run_method

__all__ = [
    "MethodResult",
    "evaluate_distributed",
    "evaluate_method",
    "read_prompts",
    "run_config",
    "run_method",
]
