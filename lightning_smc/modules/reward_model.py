"""``RewardModelModule``: train a differentiable ``LearnedReward`` to imitate a text scorer.

The data (``RewardDataModule``) are corpus rows in the base model's tokens with a scorer's
score each (e.g. VADER compound). The loss is

- ``loss="mse"`` (default): ``mean (r_phi(x) - score(x))^2`` on the reward's output;
- ``loss="bce"``: binary cross-entropy of the reward's pre-activation ``z_phi(x)`` against
  ``score(x) > threshold`` (use ``activation: log_sigmoid`` so the exported reward is
  ``log p(success | x)``).

Validation logs ``val/mse`` (output vs score), ``val/pearson`` and ``val/spearman`` (torchmetrics)
between the reward and the scorer. At the end of ``fit`` the reward is written in Hugging Face
layout (``LearnedReward.save_pretrained``, with the data module's tokenizer) to ``export_dir``,
default ``<trainer.default_root_dir>/reward`` (not after a fit with no optimizer step);
``LearnedReward.from_pretrained`` loads it::

    python -m lightning_smc.fit --config configs/reward/sentiment_tiny.yaml
    reward = LearnedReward.from_pretrained("outputs/sentiment_reward_tiny/reward")
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

from ..rewards.learned import LearnedReward

__all__ = ["RewardModelModule"]

LOSSES = ("mse", "bce")


class RewardModelModule(pl.LightningModule):
    """Fit a ``LearnedReward`` to scorer labels by regression (MSE) or classification (BCE).

    Args:
        reward: the network to train (``LearnedReward``); its ``vocab_size`` must be the base
            model's (checked against the data module at ``setup``).
        loss: ``"mse"`` or ``"bce"`` (see the module docstring).
        threshold: the BCE label is ``score > threshold`` (``None``: the reward's
            ``success_threshold``).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up, then cosine decay to
            ``min_lr_ratio * lr`` at ``trainer.max_steps`` (constant when max_steps is unset).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        export_dir: where the trained reward is saved at the end of ``fit`` (``None``:
            ``<default_root_dir>/reward``).
        token_prior: when > 0 and the data module has ``token_scores`` (``RewardDataModule``),
            column 0 of the reward's embedding is set, before training, to ``token_prior``
            times the scorer's score of each token's own text (a lexicon-like prior that helps
            tokens rare in the corpus); ``0`` keeps the random initialization. A resumed run
            restores its checkpoint's weights over it.
    """

    def __init__(
        self,
        reward: LearnedReward,
        loss: str = "mse",
        threshold: float | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        export_dir: str | None = None,
        token_prior: float = 0.0,
    ) -> None:
        super().__init__()
        checks = [
            (loss in LOSSES, f"loss={loss!r}: choose one of {LOSSES}"),
            (math.isfinite(lr) and lr > 0, f"lr={lr} must be a finite number > 0"),
            (weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0"),
            (warmup_steps >= 0, f"warmup_steps={warmup_steps} must be >= 0"),
            (0 <= min_lr_ratio <= 1, f"min_lr_ratio={min_lr_ratio} must lie in [0, 1]"),
            (token_prior >= 0, f"token_prior={token_prior} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not isinstance(reward, LearnedReward):
            raise TypeError(f"reward must be a LearnedReward, got {type(reward).__name__}")
        if loss == "bce" and reward.config.activation == "tanh":
            raise ValueError(
                "loss='bce' trains the pre-activation as a logit; build the reward with "
                "activation='log_sigmoid' (or 'linear') so its output keeps that meaning"
            )
        self.save_hyperparameters(ignore=["reward"])
        self.reward = reward
        self.threshold = reward.success_threshold if threshold is None else float(threshold)
        self.val_mse = MeanSquaredError()
        self.val_pearson = PearsonCorrCoef()
        with warnings.catch_warnings():  # it buffers all predictions: fine for a val split
            warnings.filterwarnings("ignore", message=".*SpearmanCorrcoef.*", category=UserWarning)
            self.val_spearman = SpearmanCorrCoef()

    def setup(self, stage: str) -> None:
        """Check the data module's vocabulary; write the token prior before fitting."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        check = getattr(datamodule, "check_compatible", None)
        if callable(check):
            check(vocab_size=self.reward.vocab_size, mask_id=self.reward.mask_id)
        if stage == "fit" and self.hparams.token_prior > 0 and hasattr(datamodule, "token_scores"):
            self.apply_token_prior(datamodule.token_scores())

    @torch.no_grad()
    def apply_token_prior(self, scores) -> None:
        """Set embedding column 0 to ``token_prior * scores`` (``[vocab_size]``)."""
        scores = torch.as_tensor(scores, dtype=self.reward.embedding.dtype)
        if scores.shape != (self.reward.vocab_size,):
            raise ValueError(
                f"token scores have shape {tuple(scores.shape)}, not [{self.reward.vocab_size}]"
            )
        self.reward.embedding[:, 0] = self.hparams.token_prior * scores.to(self.device)

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x0, score = batch["input_ids"], batch["score"].float()
        if self.hparams.loss == "bce":
            z = self.reward.logits(x0)
            loss = F.binary_cross_entropy_with_logits(z, (score > self.threshold).float())
            return loss, self.reward.activate(z)
        prediction = self.reward.predict(x0)
        return F.mse_loss(prediction, score), prediction

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, prediction = self._loss(batch)
        score = batch["score"].float()
        self.log("val/loss", loss, prog_bar=True, batch_size=len(score))
        self.val_mse.update(prediction, score)
        self.val_pearson.update(prediction, score)
        self.val_spearman.update(prediction, score)

    def on_validation_epoch_end(self) -> None:
        self.log("val/mse", self.val_mse.compute(), prog_bar=True)
        self.log("val/pearson", self.val_pearson.compute(), prog_bar=True)
        self.log("val/spearman", self.val_spearman.compute())
        for metric in (self.val_mse, self.val_pearson, self.val_spearman):
            metric.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.reward.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        warmup = max(1, self.hparams.warmup_steps)
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        floor = self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if max_steps is None or max_steps <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / (max_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_path(self) -> Path:
        """Where ``on_fit_end`` writes the reward."""
        if self.hparams.export_dir is not None:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.default_root_dir) / "reward"

    def on_fit_end(self) -> None:
        """Save the trained reward (eval mode, with the data module's tokenizer) in HF layout;
        nothing when no optimizer step was taken (the weights would be the random init)."""
        if not self.trainer.is_global_zero:
            return
        if self.trainer.global_step == 0:
            rank_zero_warn(
                f"fit took no optimizer step (global_step=0): the reward is untrained, so "
                f"nothing is exported to {self.export_path()}"
            )
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        out = self.reward.save_pretrained(self.export_path(), tokenizer=tokenizer)
        print(f"exported the trained reward to {out}")
