"""``RewardEvaluation``: named metrics of sampling methods, at every validation.

Each method (a ``methods.Method``) is run by ``evaluation.evaluate_distributed`` (which builds
its sampler with ``methods.build_sampler``) on the module's base denoiser; a
``DenoiserProposalSpec`` proposal uses the module's LoRA proposal ``q`` as it is at that moment.
All methods see the same prompts and seeds (one generator per prompt, ``derive_seed(seed, i)``),
so their numbers are comparable across methods and across validations.

Metrics are chosen by name (``metrics=[...]``, ``lightning_smc.metrics.registry``; default:
``reward``, ``success``, ``holdout`` (with a holdout scorer), ``ess``, ``log_z``, ``resamples``,
``overtakes``, ``nfe``, ``seconds``; ``gen_ppl``, ``entropy`` and ``dist`` on request). Logged
per method ``name`` and metric key: ``eval/<name>/<key>``, e.g. ``eval/SMCbase/reward``,
``eval/SMCbase/success``, ``eval/SMCbase/log_z_var``, ``eval/SMCbase/overtake_rate``. With a
``WandbLogger`` also, per method, a table of the answers and two images: the ESS traces and a
histogram of the final normalized particle weights. At the end of fitting a table is printed
and ``eval.json`` (every evaluation) is written to ``trainer.default_root_dir``.

Evaluation models are built once: the metric sets (and the ``gen_ppl`` scorer, on this rank's
device) in ``setup``, before training starts, so a missing scorer fails at once; they are
reset and reused at every validation.

**Under DDP** every rank runs the callback: it samples its block of the prompts (a prompt's
answer depends only on its global index, never on the rank or batch), the metrics are reduced
across ranks by torchmetrics in prompt order, so the numbers equal a single process's; the
answers are gathered for the tables. W&B media and ``eval.json`` are written by rank zero; the
reduced scalars are logged from every rank (identical values; ``reduce_fx="max"`` keeps them
exact) so that checkpoint / early-stopping monitors can use them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..evaluation import MethodResult, evaluate_distributed
from ..evaluation.report import summary_table
from ..methods import Method
from ..metrics.perplexity import SMOLLM2, check_scorer
from ..metrics.registry import (
    DEFAULT_METRICS,
    MetricSet,
    parse_metric_names,
    success_threshold_of,
)
from ..rewards import BaseReward

__all__ = ["RewardEvaluation"]

TEXT_METRICS = ("gen_ppl", "dist")  # read decoded texts: need the diffusion model's tokenizer


class RewardEvaluation(L.Callback):
    """Args:
    methods: the ``Method``s to run (names must be unique).
    num_prompts: sequences per method (unconditional).
    seq_len: generated length (default: the module's ``hparams.seq_len``).
    reward: the steering reward (default: the module's ``reward``).
    holdout: a different scorer reported alongside (not steered on).
    success_threshold: success = reward > threshold, in reward units (default: the reward's
        ``success_threshold`` times its ``scale``, else 0).
    every_n_validations: run at the 1st, (k+1)-th, ... validation.
    seed: the seed of the prompts' generators.
    guide: a differentiable surrogate for ``GradientProposalSpec`` methods (``build_sampler``).
    metrics: metric names (``metrics.registry.METRICS``); ``None``: the defaults above.
    gen_ppl_model: the causal LM of ``gen_ppl`` (``"smollm2"``, a ``.gguf`` file, a
        ``save_pretrained`` directory or a hub name); ``gen_ppl_batch_size``: its batch size.
    tokenizer: decodes answers to text (``"embedded"``, a directory); default: the reward's.

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
        metrics: list[str] | None = None,
        gen_ppl_model: str = SMOLLM2,
        gen_ppl_batch_size: int = 8,
        tokenizer: str | None = None,
    ):
        if not methods:
            raise ValueError("RewardEvaluation needs at least one method")
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardEvaluation method names must be unique, got {names}")
        if num_prompts < 1 or every_n_validations < 1:
            raise ValueError("num_prompts and every_n_validations must be >= 1")
        self.metric_names = None if metrics is None else parse_metric_names(metrics)
        if self.metric_names is not None and "holdout" in self.metric_names and holdout is None:
            raise ValueError(
                "RewardEvaluation: metric 'holdout' needs holdout: (a reward class_path/init_args)"
            )
        if self.metric_names is not None and "gen_ppl" in self.metric_names:
            try:
                check_scorer(gen_ppl_model)  # cheap: the file exists; loaded in setup()
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"RewardEvaluation: metric 'gen_ppl': gen_ppl_model={gen_ppl_model!r} "
                    f"cannot be found ({err})"
                ) from err
        self.methods, self.num_prompts, self.seq_len = methods, num_prompts, seq_len
        self.reward, self.holdout = reward, holdout
        self.success_threshold = success_threshold
        self.every, self.seed, self.guide = every_n_validations, seed, guide
        self.gen_ppl_model, self.gen_ppl_batch_size = str(gen_ppl_model), gen_ppl_batch_size
        self.tokenizer = tokenizer
        self.validations = 0
        self.history: list[dict[str, Any]] = []
        self.last_samples: dict[str, MethodResult] = {}  # the last evaluation's answers (all ranks)
        self._metric_sets: dict[str, MetricSet] | None = None  # built once, reused
        self._decoder: Any = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build the metric sets (and load their scorers) before training starts."""
        if stage == "fit":
            self._build(pl_module, trainer.strategy.root_device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every:
            return
        smoke = bool(trainer.fast_dev_run)
        results = self.evaluate(pl_module, smoke=smoke)
        self.history.append({"step": trainer.global_step, **results})
        for name, row in results.items():
            for key, value in row.items():
                # identical on every rank (already reduced): "max" keeps the value exact
                pl_module.log(
                    f"eval/{name}/{key}",
                    value,
                    batch_size=self.num_prompts,
                    sync_dist=True,
                    reduce_fx="max",
                )
        self._log_media(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not self.history:
            return
        self._report(Path(trainer.default_root_dir))

    # ------------------------------------------------------------------ work
    def _reward(self, pl_module: L.LightningModule) -> Any:
        reward = self.reward if self.reward is not None else getattr(pl_module, "reward", None)
        if reward is None:
            raise ValueError("RewardEvaluation needs reward= or a module with a .reward")
        return reward

    def _tokenizer(self, reward: Any) -> Any:
        if self._decoder is None and self.tokenizer is not None:
            from ..rewards.text import resolve_tokenizer

            self._decoder = resolve_tokenizer(self.tokenizer).tokenizer
        if self._decoder is not None:
            return self._decoder
        return getattr(getattr(reward, "spec", None), "tokenizer", None)

    def _build(self, pl_module: L.LightningModule, device: torch.device) -> dict[str, MetricSet]:
        """The metric set of every method, built once (its scorers loaded on ``device``)."""
        if self._metric_sets is not None:
            return self._metric_sets
        reward = self._reward(pl_module)
        names = self.metric_names
        text_metrics = [m for m in (names or ()) if m in TEXT_METRICS]
        if text_metrics and self._tokenizer(reward) is None:
            raise ValueError(
                f"RewardEvaluation: metrics {text_metrics} read decoded texts, but the reward has "
                "no tokenizer; pass tokenizer: (e.g. embedded, or the model's directory)"
            )
        threshold = self.success_threshold
        if threshold is None:
            threshold = success_threshold_of(reward) or 0.0
        self._metric_sets = {
            method.name: MetricSet(
                names,
                defaults=DEFAULT_METRICS,
                reward=True,
                holdout=self.holdout is not None,
                success_threshold=threshold,
                gen_ppl_model=self.gen_ppl_model,
                gen_ppl_batch_size=self.gen_ppl_batch_size,
                device=device,
            )
            for method in self.methods
        }
        return self._metric_sets

    def evaluate(
        self, pl_module: L.LightningModule, smoke: bool = False
    ) -> dict[str, dict[str, float]]:
        """``{method name: {metric key: value}}`` for the module now, over every rank of the
        process group (every rank must call it); ``smoke``: 2 prompts, at most 2 particles and
        4 steps."""
        reward = self._reward(pl_module)
        metric_sets = self._build(pl_module, pl_module.device)
        lora = getattr(pl_module, "q", None)
        base = lora.base_denoiser if lora is not None else pl_module.denoiser
        tokenizer = self._tokenizer(reward)
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
                metrics = metric_sets[method.name].to(pl_module.device)
                summary, result = evaluate_distributed(
                    method,
                    metrics,
                    base,
                    tokenizer,
                    num_samples=num_prompts,
                    reward=reward,
                    holdout=self.holdout,
                    guide=self.guide,
                    seq_len=self.seq_len or pl_module.hparams.seq_len,
                    batch_size=num_prompts,
                    seed=self.seed,
                    amortized=lora,
                )
                results[method.name] = summary
                self.last_samples[method.name] = result
        finally:
            pl_module.train(was_training)
        return results

    def _log_media(self, trainer: L.Trainer) -> None:
        """With a ``WandbLogger`` (rank zero): per method, a table of the answers (text, reward,
        log Ẑ), an image of the ESS traces (one line per prompt, dots where a resample
        followed) and a histogram of the final normalized particle weights."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        for name, result in self.last_samples.items():
            rows = [
                [
                    int(result.index[i]),
                    text,
                    float(result.reward[i]),
                    float(result.log_normalizer[i]),
                ]
                for i, text in enumerate(result.texts)
            ]
            ess = _ess_figure(result, f"{name}: ESS after each step")
            weights = _weight_figure(result, f"{name}: final particle weights")
            for logger in loggers:
                logger.log_table(
                    key=f"eval/{name}/samples",
                    columns=["prompt", "text", "reward", "log_Z"],
                    data=rows,
                    step=trainer.global_step,
                )
                logger.log_image(key=f"eval/{name}/ess", images=[ess], step=trainer.global_step)
                logger.log_image(
                    key=f"eval/{name}/weights", images=[weights], step=trainer.global_step
                )

    @rank_zero_only
    def _report(self, root: Path) -> None:
        from rich.console import Console

        last = self.history[-1]
        rows = {n: v for n, v in last.items() if n != "step"}
        title = f"Reward evaluation at step {last['step']} ({self.num_prompts} samples)"
        table = summary_table(title, rows)
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


def _weight_figure(result: Any, title: str):
    """Histogram of the final normalized weights of every particle of every prompt, with the
    uniform weight ``1/N`` marked (all mass there: no degeneracy)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3))
    axis = figure.subplots()
    weights = result.weights.double().cpu().flatten().numpy()
    axis.hist(weights, bins=20, range=(0.0, 1.0), color="tab:blue")
    axis.axvline(1.0 / result.num_particles, color="tab:red", ls="--", lw=1, label="1/N")
    axis.set_xlabel("normalized weight")
    axis.set_ylabel("particles")
    axis.legend(fontsize=8)
    axis.set_title(f"{title} (N={result.num_particles}, {len(result)} prompts)", fontsize=9)
    figure.tight_layout()
    return figure
