"""``VQPretraining``: train a ``VQTokenizer`` (a diffusers ``VQModel``) on images.

For images ``x [B, C, H, W]`` in ``[0, 1]`` the loss is

    L = mean (decode(q(z)) - x)^2  +  quantizer_weight * L_q,      z = encoder(x)

where ``q`` is diffusers' ``VectorQuantizer`` (nearest code, straight-through gradients) and
``L_q`` its own loss: ``mean (sg[q(z)] - z)^2 + 0.25 * mean (q(z) - sg[z])^2`` (diffusers'
"legacy" weighting: the commitment term at weight 1, the codebook term at 0.25).

**Dead-code restarts** (``restart_every > 0``): an exponential moving average of each code's
count per training batch (``code_ema``, decay ``usage_decay``) is kept as a buffer; every
``restart_every`` steps, before the forward pass, codes whose average falls below
``dead_below`` are moved onto latents of the current batch drawn with a generator seeded by
``derive_seed(seed, global_step)``, and their average is reset to 1. Everything here is
deterministic (no dropout; the draws are seeded; ``code_ema`` is in the checkpoint), so with
``FashionMNISTDataModule``'s resumable loader a run resumed from ``last.ckpt`` reproduces the
uninterrupted run's weights exactly.

Validation logs ``val/recon_mse`` (clamped reconstruction vs image, per pixel),
``val/code_usage`` (fraction of codes used on the val split) and ``val/code_perplexity``.
At the end of ``fit`` the tokenizer is saved with ``save_pretrained`` to ``export_dir``
(default ``<trainer.default_root_dir>/vq``)::

    python -m lightning_smc.fit --config configs/pretrain/vq_fmnist_tiny.yaml
    tok = VQTokenizer.from_pretrained("outputs/vq_fmnist_tiny/vq")
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from ..metrics.codes import CodeUsage
from ..models.vq import VQTokenizer
from ..smc import derive_seed

__all__ = ["VQPretraining"]


class VQPretraining(pl.LightningModule):
    """Fit a ``VQTokenizer`` by reconstruction + diffusers' quantizer loss.

    Args:
        tokenizer: the ``VQTokenizer`` to train (its ``VQModel`` config fixes the architecture).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up, then constant.
        quantizer_weight: weight of diffusers' quantizer loss ``L_q``.
        restart_every: steps between dead-code restarts (``0``: never).
        dead_below: a code is dead when its average count per batch is below this.
        usage_decay: decay of the per-code count average.
        seed: seeds the restart draws.
        export_dir: where ``save_pretrained`` writes at the end of fit (``None``:
            ``<default_root_dir>/vq``).
    """

    def __init__(
        self,
        tokenizer: VQTokenizer,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        quantizer_weight: float = 1.0,
        restart_every: int = 50,
        dead_below: float = 0.05,
        usage_decay: float = 0.95,
        seed: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        checks = [
            (isinstance(tokenizer, VQTokenizer), "tokenizer must be a VQTokenizer"),
            (math.isfinite(lr) and lr > 0, f"lr={lr} must be a finite number > 0"),
            (weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0"),
            (warmup_steps >= 0, f"warmup_steps={warmup_steps} must be >= 0"),
            (quantizer_weight >= 0, f"quantizer_weight={quantizer_weight} must be >= 0"),
            (restart_every >= 0, f"restart_every={restart_every} must be >= 0 (0: never)"),
            (dead_below >= 0, f"dead_below={dead_below} must be >= 0"),
            (0 <= usage_decay < 1, f"usage_decay={usage_decay} must lie in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.register_buffer("code_ema", torch.ones(tokenizer.codebook_size, dtype=torch.float64))
        self.val_mse = MeanMetric()
        self.val_codes = CodeUsage(tokenizer.codebook_size)

    @staticmethod
    def _images(batch) -> Tensor:
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    @torch.no_grad()
    def restart_dead_codes(self, latents: Tensor) -> int:
        """Move codes with ``code_ema < dead_below`` onto random rows of ``latents
        [B, D, h, w]``; returns how many moved."""
        dead = (self.code_ema < self.hparams.dead_below).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        rows = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        g = torch.Generator().manual_seed(derive_seed(self.hparams.seed, self.global_step))
        pick = torch.randint(len(rows), (dead.numel(),), generator=g).to(rows.device)
        self.tokenizer.codebook.data[dead] = rows[pick].to(self.tokenizer.codebook.dtype)
        self.code_ema[dead] = 1.0
        return int(dead.numel())

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x = self._images(batch)
        z = self.tokenizer.latents(x)
        every = self.hparams.restart_every
        if every and self.global_step > 0 and self.global_step % every == 0:
            self.log("train/restarted_codes", float(self.restart_dead_codes(z.detach())))
        z_q, q_loss, tokens = self.tokenizer.quantize(z)
        recon = self.tokenizer.decode_latents(z_q)
        mse = F.mse_loss(recon, x)
        loss = mse + self.hparams.quantizer_weight * q_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        counts = torch.bincount(tokens.reshape(-1), minlength=self.tokenizer.codebook_size)
        decay = self.hparams.usage_decay
        self.code_ema.mul_(decay).add_(counts.to(self.code_ema), alpha=1 - decay)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/recon_mse", mse)
        self.log("train/quantizer_loss", q_loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x = self._images(batch)
        out = self.tokenizer(x)
        per_image = (out.reconstruction.clamp(0, 1) - x).pow(2).flatten(1).mean(1)
        self.val_mse.update(per_image)
        self.val_codes.update(out.tokens)

    def on_validation_epoch_end(self) -> None:
        codes = self.val_codes.compute()
        self.log("val/recon_mse", self.val_mse.compute(), prog_bar=True)
        self.log("val/code_usage", codes["usage"].float(), prog_bar=True)
        self.log("val/code_perplexity", codes["perplexity"].float())
        self.val_mse.reset()
        self.val_codes.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.tokenizer.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_path(self) -> Path:
        if self.hparams.export_dir is not None:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.default_root_dir) / "vq"

    def on_fit_end(self) -> None:
        """Save the trained tokenizer (nothing when no optimizer step was taken)."""
        if not self.trainer.is_global_zero:
            return
        if self.trainer.global_step == 0:
            rank_zero_warn("fit took no optimizer step: the tokenizer is untrained, not exported")
            return
        out = self.tokenizer.save_pretrained(self.export_path())
        print(f"exported the trained VQ tokenizer to {out}")
