"""Lightning callbacks that evaluate samplers during training (they only log; they never train).

- ``RewardEvaluation``: after each validation, runs named ``Method``s through the shared sampler
  on fixed seeds and logs metrics chosen by name (reward, success rate, holdout, gen PPL,
  entropy, Dist-n, ESS, log Ẑ mean / variance, resamples, overtakes, NFE, seconds) per method,
  reduced across DDP ranks; with W&B also tables, ESS traces and weight histograms; at the end
  of fitting prints a table and writes ``eval.json``.
- ``ImageEvaluation``: at validation, runs named ``Method``s on a class-conditional image model
  for fixed labels and seeds and logs class accuracy, ESS (and FID / IS when requested) per
  method, an image grid per method and a strip of one prompt's particles around a resample;
  with a reward (or the module's) also reward / success / holdout, so the steering methods
  (SMCbase, SMCgrad, SMCamot with the module's LoRA proposal) run at validation; under DDP the
  labels are split over the ranks and the metrics equal one process's.
- ``ReasoningEvalCallback``: at validation, generates answers to a fixed subset of a reasoning
  benchmark (GSM8K, MATH-500, HumanEval, MBPP) with a ``generate(prompts)`` function (e.g.
  ``methods.complete_prompts``), logs accuracy +- SE and writes ``samples.jsonl``.
"""

from .image_eval import ImageEvaluation
from .reasoning_eval import ReasoningEvalCallback
from .reward_eval import RewardEvaluation

__all__ = ["ImageEvaluation", "ReasoningEvalCallback", "RewardEvaluation"]
