"""Lightning callbacks that evaluate samplers during training (they only log; they never train).

- ``RewardEvaluation``: after each validation, runs named ``Method``s through the shared sampler
  on fixed seeds and logs the reward mean, success rate and holdout reward per method; at the
  end of fitting prints a table and writes ``eval.json``.
"""

from .reward_eval import RewardEvaluation

__all__ = ["RewardEvaluation"]
