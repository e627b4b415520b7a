"""``MDLMPretraining``: the MDLM continuous-time ELBO as a LightningModule.

For clean text ``x0 [B, L]``: draw ``t`` antithetically, ``t_b = eps + (1 - eps) * ((u + b/B) mod 1)``,
mask every token independently with probability ``1 - alpha(t_b)`` to get ``x_t``, and minimise

    L = E_t [ w(t) * sum_{i : x_t^i = mask} -log p_theta(x0^i | x_t) ] / L,    w(t) = -alpha'(t) / (1 - alpha(t))

(``w = 1/t`` for the log-linear schedule). The per-token loss is an upper bound on the NLL;
validation reports ``val/nll`` and ``val/ppl_bound = exp(val/nll)`` as torchmetrics metrics.
EMA weights come from Lightning's ``EMAWeightAveraging`` callback, which swaps them in for
validation and into the final model (so ``fit``'s Hugging Face export holds the EMA weights).
Randomness per step is seeded from ``derive_seed(seed, global_step, rank)``: ``t`` and the masks
from an explicit generator, dropout from the global RNG forked and seeded for the step's forward
pass. With ``TextDataModule``'s resumable train loader, a run resumed from a mid-epoch
checkpoint therefore reproduces the uninterrupted run's weights exactly.
The denoiser is injected (any ``nn.Module`` implementing ``ls.Denoiser``); at ``setup`` a data
module with ``check_compatible`` (``TextDataModule``) is checked against the denoiser's
``vocab_size``, ``mask_id`` and ``config.model_length``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..diffusion import get_schedule
from ..smc import derive_seed

__all__ = ["MDLMPretraining", "masked_diffusion_loss"]


def masked_diffusion_loss(
    denoiser: nn.Module,
    x0: Tensor,
    schedule,
    generator: torch.Generator,
    eps: float = 1e-3,
    maskable: Tensor | None = None,
) -> Tensor:
    """Per-sequence ELBO terms ``[B]`` (mean over positions) for clean ``x0``.

    ``maskable [B, L]`` (bool, optional): only these positions are ever masked and the sum is
    divided by their count instead of ``L`` (LLaDA's SFT: the response, never the prompt)."""
    B, L = x0.shape
    u = torch.rand((), generator=generator, device=generator.device).to(x0.device)
    t = eps + (1 - eps) * ((u + torch.arange(B, device=x0.device) / B) % 1.0)
    move = 1.0 - schedule.alpha(t)
    noise = torch.rand((B, L), generator=generator, device=generator.device).to(x0.device)
    masked = noise < move.unsqueeze(1)
    if maskable is not None:
        masked, L = masked & maskable, maskable.sum(-1).clamp_min(1)
    x_t = torch.where(masked, torch.full_like(x0, denoiser.mask_id), x0)
    log_p = torch.log_softmax(denoiser(x_t, t).float(), dim=-1)
    nll = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(masked, nll, torch.zeros_like(nll))
    return schedule.loss_weight(t) * nll.sum(-1) / L


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the global CPU (and this CUDA device's) RNG seeded, restoring it afterwards.

    Dropout draws from the global RNG, which checkpoints do not hold; seeding it per step makes
    those draws a function of the step, so a resumed run repeats them.
    """
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class MDLMPretraining(pl.LightningModule):
    """Pretrain a masked-diffusion denoiser with the MDLM ELBO.

    Args:
        denoiser: the network (e.g. ``MDLMDenoiser``); its ``mask_id`` is used for masking.
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up, then constant.
        schedule: ``alpha(t)`` (``"loglinear"`` as MDLM).
        eps: smallest time drawn (keeps ``w(t)`` finite).
        seed: global seed for per-step randomness.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        schedule: str = "loglinear",
        eps: float = 1e-3,
        seed: int = 0,
    ):
        super().__init__()
        _check_hparams(lr, weight_decay, betas, warmup_steps, eps)
        for name in ("vocab_size", "mask_id"):
            if not hasattr(denoiser, name):
                raise TypeError(f"denoiser {type(denoiser).__name__} has no `{name}` (ls.Denoiser)")
        self.save_hyperparameters(ignore=["denoiser"])
        self.denoiser = denoiser
        self.schedule = get_schedule(schedule)
        self.val_nll = MeanMetric()

    def setup(self, stage: str) -> None:
        """Check the data module (when it has ``check_compatible``) against the denoiser."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        check = getattr(datamodule, "check_compatible", None)
        if callable(check):
            config = getattr(self.denoiser, "config", None)
            check(
                vocab_size=self.denoiser.vocab_size,
                mask_id=self.denoiser.mask_id,
                max_len=getattr(config, "model_length", None),
            )

    def _generator(self, stage: int) -> torch.Generator:
        seed = derive_seed(self.hparams.seed, stage, self.global_step, self.global_rank)
        return torch.Generator(device="cpu").manual_seed(seed)

    @staticmethod
    def _tokens(batch) -> Tensor:
        return batch["input_ids"] if isinstance(batch, dict) else batch

    def _nll(self, batch, generator: torch.Generator) -> Tensor:
        """Per-sequence loss terms ``[B]`` of a training batch (subclasses change what is masked)."""
        x0 = self._tokens(batch)
        return masked_diffusion_loss(self.denoiser, x0, self.schedule, generator, self.hparams.eps)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        dropout_seed = derive_seed(self.hparams.seed, 2, self.global_step, self.global_rank)
        with _seeded_global_rng(dropout_seed, self.device):
            nll = self._nll(batch, self._generator(0))
        loss = nll.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(derive_seed(self.hparams.seed, 1, batch_idx))
        x0 = self._tokens(batch)
        nll = masked_diffusion_loss(self.denoiser, x0, self.schedule, g, self.hparams.eps)
        self.val_nll.update(nll, weight=torch.full_like(nll, float(x0.shape[1])))

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.log("val/nll", nll, prog_bar=True, sync_dist=False)
        self.log("val/ppl_bound", torch.exp(nll))
        self.val_nll.reset()

    def configure_optimizers(self):
        decay = [p for n, p in self.denoiser.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            decay,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _check_hparams(lr, weight_decay, betas, warmup_steps, eps) -> None:
    b1, b2 = betas
    checks = [
        (math.isfinite(lr) and lr > 0, f"lr={lr} must be a finite number > 0"),
        (weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0"),
        (0 <= b1 < 1 and 0 <= b2 < 1, f"betas={tuple(betas)} must both lie in [0, 1)"),
        (warmup_steps >= 0, f"warmup_steps={warmup_steps} must be >= 0"),
        (0 < eps < 1, f"eps={eps} must lie in (0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
