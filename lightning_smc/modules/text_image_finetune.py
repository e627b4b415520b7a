"""``TextImageFinetuning``: fine-tune a text-to-image Meissonic / Monetico on image-caption pairs.

The model is a Hub-layout pipeline (``models.text_cond.load_text_image_model``: ``transformer/``,
``vqvae/``, ``text_encoder/``, ``tokenizer/``); only the transformer trains, the VQ tokenizer and
the CLIP text encoder stay frozen. For a batch ``(images [B, C, R, R] in [0, 1], captions)``:

- ``x0`` = the VQ token grids of the images, flattened ``[B, h * w]``;
- each caption becomes ``""`` (the CFG null condition) with probability ``cond_dropout``;
  ``cond`` = the captions' CLIP condition (``hidden_states[-2]``, ``text_embeds``, micro-conditions
  ``(R, R, 0, 0, 6)``);
- ``t ~ U(0, 1)``; ``round(L (1 - alpha(t)))`` uniformly drawn positions masked (``schedule``:
  MaskGIT's cosine, as ``ImagePretraining``); with ``min_masking_rate`` the masked share is at
  least that (train_meissonic.py's flag);
- loss: cross-entropy of the transformer's codebook logits at the masked positions.

Every draw comes from generators seeded by ``derive_seed(seed, stage, global_step, rank)``. At the
end of fit the fine-tuned pipeline is written in the Hub layout to ``export_dir`` (default
``<default_root_dir>/pipeline``), loadable by ``load_text_image_model``. Config:
``configs/pretrain/meissonic_monetico_finetune.yaml`` (GPU, hub).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..diffusion import get_schedule
from ..models.text_cond import load_text_image_model
from ..smc import derive_seed

__all__ = ["TextImageFinetuning", "mask_tokens"]


def mask_tokens(
    x0: Tensor, mask_id: int, schedule, generator: torch.Generator, min_share: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, masked, t)``: ``t ~ U(0, 1)`` per row, ``round(L * max(1 - alpha(t), min_share))``
    (at least 1) uniformly drawn positions masked."""
    B, L = x0.shape
    t = torch.rand(B, generator=generator, dtype=torch.float64)
    share = (1.0 - schedule.alpha(t)).clamp_min(min_share)
    count = (share * L).round().clamp(1, L).long()
    rank = torch.rand(B, L, generator=generator).argsort(-1).argsort(-1)
    masked = (rank < count.unsqueeze(1)).to(x0.device)
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, t.float().to(x0.device)


class TextImageFinetuning(pl.LightningModule):
    """Masked-token fine-tuning of a text-to-image Meissonic (see the module docstring).

    Args:
        pretrained: a pipeline folder in the Hub layout or a hub id (``Collov-Labs/Monetico``).
        resolution: training image side in pixels (``None``: the loader's default, 512 for
            Monetico); must match the data module's.
        local_files_only: never reach the hub (the folder or the hub cache must hold the model).
        lr, weight_decay, betas, warmup_steps: AdamW, linear warm-up then constant.
        schedule: mask schedule ``alpha(t)``.
        cond_dropout: probability that a caption is replaced by the empty prompt (CFG).
        min_masking_rate: lower bound of the masked share of a grid.
        seed: seeds every draw.
        export_dir: where the fine-tuned pipeline is written (``None``: ``<root>/pipeline``).
    """

    def __init__(
        self,
        pretrained: str,
        resolution: int | None = None,
        local_files_only: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        schedule: str = "maskgit_cosine",
        cond_dropout: float = 0.1,
        min_masking_rate: float = 0.0,
        seed: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(lr) and lr > 0 and 0 <= cond_dropout < 1):
            raise ValueError(f"lr={lr} must be > 0 and cond_dropout={cond_dropout} in [0, 1)")
        if not 0 <= min_masking_rate < 1:
            raise ValueError(f"min_masking_rate={min_masking_rate} must lie in [0, 1)")
        self.save_hyperparameters()
        model = load_text_image_model(
            pretrained, resolution=resolution, local_files_only=local_files_only
        )
        self.denoiser, self.vq, self.text = model.denoiser, model.vq, model.text
        self.vq.requires_grad_(False).eval()
        self.text.requires_grad_(False).eval()
        self.schedule = get_schedule(schedule)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()
        self.text.eval()
        return self

    def _generator(self, *stage: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.hparams.seed, *stage))

    def loss(self, batch, generator: torch.Generator, drop: bool) -> Tensor:
        images, captions = batch
        with torch.no_grad():
            x0 = self.vq.encode(images).flatten(1)
        if drop:
            keep = torch.rand(len(captions), generator=generator) >= self.hparams.cond_dropout
            captions = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
        side = images.shape[-1]
        cond = self.text(list(captions), width=side, height=side)
        x_t, masked, t = mask_tokens(
            x0, self.denoiser.mask_id, self.schedule, generator, self.hparams.min_masking_rate
        )
        logits = self.denoiser.network(x_t, t, cond)  # [B, L, K]
        return F.cross_entropy(logits[masked].float(), x0[masked])

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch, self._generator(0, self.global_step, self.global_rank), drop=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self.loss(batch, self._generator(1, batch_idx), drop=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch[1]))

    def configure_optimizers(self):
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, folder: str | Path) -> Path:
        """Write the pipeline in the Hub layout (``load_text_image_model`` reads it back)."""
        folder = Path(folder)
        self.denoiser.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        self.vq.vq.save_pretrained(folder / "vqvae", safe_serialization=True)
        self.text.text_encoder.save_pretrained(folder / "text_encoder")
        self.text.tokenizer.save_pretrained(folder / "tokenizer")
        return folder

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero or self.trainer.global_step == 0:
            return
        root = self.hparams.export_dir or Path(self.trainer.default_root_dir) / "pipeline"
        print(f"exported the fine-tuned pipeline to {self.export(root)}")
