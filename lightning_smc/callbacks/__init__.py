"""Lightning callbacks that evaluate samplers during training (they only log; they never train).

- ``RewardEvaluation``: after each validation, runs named ``Method``s through the shared sampler
  on fixed seeds and logs metrics chosen by name (reward, success rate, holdout, gen PPL,
  entropy, Dist-n, ESS, log Ẑ mean / variance, resamples, overtakes, NFE, seconds) per method,
  reduced across DDP ranks; with W&B also tables, ESS traces and weight histograms; at the end
  of fitting prints a table and writes ``eval.json``.
"""

from .reward_eval import RewardEvaluation

__all__ = ["RewardEvaluation"]
