"""Evaluation: running named methods over prompts, their results and reports (DESIGN §2).

=======================  =====================================================================
``run.py``               ``run_method(method, denoiser, tokenizer, prompts / num_samples,
                         reward=, holdout=, seq_len=, batch_size=, seed=, shard=)`` -> one
                         ``MethodResult``; ``evaluate_distributed`` (every rank samples its
                         shard, metrics reduced); ``run_config`` / ``evaluate_method`` for a
                         parsed method config file; ``read_prompts``
``result.py``            ``MethodResult``: answers, scores, ``log Ẑ``, weights, ESS traces;
                         ``merge`` (batches / shards in prompt order), ``summary`` (metrics)
``reasoning.py``         reasoning benchmarks: lm-eval-style few-shot prompts (``build_prompt``),
                         GSM8K / MATH answer extraction and normalization, ``score``,
                         ``evaluate_completions`` (accuracy +- SE, pass@k), ``pass_at_k``
``sandbox.py``           ``run_code`` / ``run_many``: generated code in a separate, limited
                         process (temp dir, rlimits, no network, dangerous calls disabled)
``images.py``            image method configs: grids, strips, class accuracy, FID / IS
=======================  =====================================================================

Layering: this package uses ``methods`` (the method vocabulary and its builder), the sampler,
rewards, metrics and models; nothing below it imports it. Example::

    from lightning_smc.evaluation import evaluate_method
    from lightning_smc.methods import load_method_config
    from lightning_smc.metrics import MetricSet

    config = load_method_config("configs/methods/embedded/srsmc.yaml")
    summary, result = evaluate_method(config, MetricSet(["reward", "ess", "log_z"]))
"""

from .reasoning import build_prompt, evaluate_completions, pass_at_k, score
from .result import MethodResult
from .run import evaluate_distributed, evaluate_method, read_prompts, run_config, run_method
from .sandbox import SandboxResult, run_code, run_many

__all__ = [
    "MethodResult",
    "SandboxResult",
    "build_prompt",
    "evaluate_completions",
    "evaluate_distributed",
    "evaluate_method",
    "pass_at_k",
    "read_prompts",
    "run_code",
    "run_config",
    "run_many",
    "run_method",
    "score",
]
