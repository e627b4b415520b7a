"""``RewardEvaluation``: reward mean and success rate per sampling method, at every validation.

Each method (a ``methods.Method``) is built with ``build_sampler`` on the module's base
denoiser; ``proposal: amortized`` uses the module's LoRA proposal ``q`` as it is at that moment.
All methods see the same prompts and seeds (one generator per prompt, ``derive_seed(seed, i)``),
so their numbers are comparable across methods and across validations. Logged per method
``name``: ``eval/<name>/reward``, ``eval/<name>/success`` (fraction with reward above the
threshold), ``eval/<name>/holdout`` (a different scorer, if given), ``eval/<name>/ess`` (mean
ESS over steps, as a fraction of N) and ``eval/<name>/seconds`` (wall time per sequence).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ..methods import Method, MethodResult, MethodRun, run_method
from ..rewards import BaseReward

__all__ = ["RewardEvaluation"]


class RewardEvaluation(L.Callback):
    """Args:
    methods: the ``Method``s to run (names must be unique).
    num_prompts: sequences per method (unconditional).
    seq_len: generated length (default: the module's ``hparams.seq_len``).
    reward: the steering reward (default: the module's ``reward``).
    holdout: a different scorer reported alongside (not steered on).
    success_threshold: success = reward > threshold (default: the reward's
        ``success_threshold`` attribute, else 0).
    every_n_validations: run at the 1st, (k+1)-th, ... validation.
    seed: the seed of the prompts' generators.
    guide: a differentiable surrogate for ``proposal: gradient`` methods (see ``build_sampler``).

    Under ``fast_dev_run`` every method runs as a smoke test: 2 prompts, at most 2 particles
    and 4 steps.
    """

    def __init__(
        self,
        methods: list[Method],
        num_prompts: int = 16,
        seq_len: int | None = None,
        reward: BaseReward | None = None,
        holdout: BaseReward | None = None,
        success_threshold: float | None = None,
        every_n_validations: int = 1,
        seed: int = 0,
        guide: BaseReward | None = None,
    ):
        if not methods:
            raise ValueError("RewardEvaluation needs at least one method")
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardEvaluation method names must be unique, got {names}")
        if num_prompts < 1 or every_n_validations < 1:
            raise ValueError("num_prompts and every_n_validations must be >= 1")
        self.methods, self.num_prompts, self.seq_len = methods, num_prompts, seq_len
        self.reward, self.holdout = reward, holdout
        self.success_threshold = success_threshold
        self.every, self.seed, self.guide = every_n_validations, seed, guide
        self.validations = 0
        self.history: list[dict[str, Any]] = []
        self.last_samples: dict[str, MethodResult] = {}  # the last evaluation's answers

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every:
            return
        smoke = bool(trainer.fast_dev_run)
        results = self.evaluate(pl_module, smoke=smoke)
        self.history.append({"step": trainer.global_step, **results})
        for name, row in self.history[-1].items():
            if name == "step":
                continue
            for key, value in row.items():
                pl_module.log(f"eval/{name}/{key}", value, batch_size=self.num_prompts)
        self._log_media(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not self.history:
            return
        self._report(Path(trainer.default_root_dir))

    # ------------------------------------------------------------------ work
    def evaluate(
        self, pl_module: L.LightningModule, smoke: bool = False
    ) -> dict[str, dict[str, float]]:
        """``{method name: {reward, success, holdout, ess, seconds}}`` for the module now
        (``smoke``: 2 prompts, at most 2 particles and 4 steps)."""
        reward = self.reward if self.reward is not None else getattr(pl_module, "reward", None)
        if reward is None:
            raise ValueError("RewardEvaluation needs reward= or a module with a .reward")
        threshold = self.success_threshold
        if threshold is None:
            threshold = getattr(reward, "success_threshold", None) or 0.0
        lora = getattr(pl_module, "q", None)
        base = lora.base_denoiser if lora is not None else pl_module.denoiser
        tokenizer = getattr(getattr(reward, "spec", None), "tokenizer", None)
        results = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            for method in self.methods:
                if smoke:
                    method = dataclasses.replace(
                        method,
                        num_particles=min(method.num_particles, 2),
                        num_steps=min(method.num_steps, 4),
                    )
                num_prompts = min(self.num_prompts, 2) if smoke else self.num_prompts
                run = MethodRun(
                    method=method,
                    model="(the module's)",
                    reward=reward,
                    holdout=self.holdout,
                    guide=self.guide,
                    tokenizer=None,
                    prompts=None,
                    seq_len=self.seq_len or pl_module.hparams.seq_len,
                    num_samples=num_prompts,
                    batch_size=num_prompts,
                    seed=self.seed,
                )
                result = run_method(run, base, tokenizer, amortized=lora)
                results[method.name] = result.summary(threshold)
                self.last_samples[method.name] = result
        finally:
            pl_module.train(was_training)
        return results

    def _log_media(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With a ``WandbLogger``: per method, a table of the answers (text, reward, log Ẑ) and
        an image of the ESS traces (one line per prompt, dots where a resample followed)."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        for name, result in self.last_samples.items():
            rows = [
                [i, text, float(result.reward[i]), float(result.log_normalizer[i])]
                for i, text in enumerate(result.texts)
            ]
            figure = _ess_figure(result, f"{name}: ESS after each step")
            for logger in loggers:
                logger.log_table(
                    key=f"eval/{name}/samples",
                    columns=["prompt", "text", "reward", "log_Z"],
                    data=rows,
                    step=trainer.global_step,
                )
                logger.log_image(key=f"eval/{name}/ess", images=[figure], step=trainer.global_step)

    @rank_zero_only
    def _report(self, root: Path) -> None:
        from rich.console import Console
        from rich.table import Table

        last = self.history[-1]
        table = Table(
            title=f"Reward evaluation at step {last['step']} ({self.num_prompts} samples)"
        )
        keys = [
            k
            for k in ("reward", "success", "holdout", "ess", "seconds")
            if k in next(v for n, v in last.items() if n != "step")
        ]
        table.add_column("method")
        for key in keys:
            table.add_column(key, justify="right")
        for name, row in last.items():
            if name != "step":
                table.add_row(name, *(_fmt(row[k]) for k in keys))
        Console().print(table)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / "eval.json.tmp"
        tmp.write_text(json.dumps(self.history, indent=2) + "\n")
        tmp.replace(root / "eval.json")


def _ess_figure(result: Any, title: str):
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    figure = Figure(figsize=(5, 3))
    axis = figure.subplots()
    ess = result.ess_trace.cpu().numpy()
    for b in range(ess.shape[0]):
        axis.plot(ess[b], lw=1)
        resampled = result.resampled[b].cpu().numpy().nonzero()[0]
        axis.scatter(resampled, ess[b][resampled], s=8)
    axis.set_xlabel("step")
    axis.set_ylabel("ESS")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"
