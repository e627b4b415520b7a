"""``ImagePretraining``: a class-conditional Meissonic on VQ token grids, MaskGIT's objective.

For a clean grid ``x0 [B, L]`` (``L = h * w`` VQ ids) with labels ``y [B]``:

- **labels** are replaced by the null class (``num_classes``) with probability
  ``class_dropout``, so that one network is also the unconditional model of CFG;
- **masks**: ``t ~ U(0, 1)`` per grid; ``n = clamp(round(L * (1 - alpha(t))), 1, L)`` positions,
  uniformly at random, become the mask id (``schedule="maskgit_cosine"``: ``1 - alpha(t) =
  sin(pi t / 2)``, MaskGIT's / Meissonic's ``cos(pi u / 2)`` with ``u = 1 - t``);
- **loss**: the mean over masked positions of ``-log p_theta(x0^i | x_t, y)`` (the network's
  codebook logits; Meissonic's cross-entropy on masked tokens).

The network sees ``x_t`` through ``MeissonicDenoiser`` (``timestep="mask_fraction"``, the
convention the sampler then uses). Images are tokenized on the fly by the frozen ``vq`` (a
``VQTokenizer`` or the folder of one, e.g. ``outputs/vq_fmnist_tiny/vq``); batches that are
already token grids (integer ``[B, h, w]`` or ``[B, h * w]``, with labels) need no VQ.

Validation logs ``val/loss`` and ``val/masked_accuracy`` (masks and ratios seeded per batch, the
same at every validation) and, with a VQ, an image grid of the first validation grids: the VQ
reconstruction, the grid half masked (masked cells grey), and the network's one-step argmax
fill-in (``val/fill_in``: to W&B when the logger is W&B, and as a PNG under
``<default_root_dir>/images/``). Without a VQ the grid is skipped with a note. Sampling is left
to ``callbacks.ImageEvaluation``.

EMA weights come from Lightning's ``EMAWeightAveraging`` callback (swapped in for validation
and copied into the model at the end of fit), as for ``MDLMPretraining``. Every draw comes from
generators seeded by ``derive_seed(seed, stage, global_step, rank)`` and the network has no
dropout, so with a resumable loader (``FashionMNISTDataModule``) a run resumed from
``last.ckpt`` reproduces the uninterrupted run's weights exactly. At the end of fit the model is
written as an image model folder (``models.image``: transformer, VQ, grid shape) to
``export_dir`` (default ``<default_root_dir>/image_model``)::

    python -m lightning_smc.fit --config configs/pretrain/meissonic_fmnist_tiny.yaml
    model = load_image_model("outputs/meissonic_fmnist_tiny/image_model")
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from ..diffusion import get_schedule
from ..evaluation.images import image_grid, save_png, to_png_array
from ..models.image import ImageModel
from ..models.meissonic import MeissonicClassTransformer, MeissonicDenoiser
from ..models.vq import VQTokenizer
from ..smc import derive_seed

__all__ = ["ImagePretraining", "mask_grids"]


def mask_grids(
    x0: Tensor, mask_id: int, schedule, generator: torch.Generator, ratio: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, masked [B, L] bool, t [B])``: ``round(L * (1 - alpha(t)))`` (at least 1) uniformly
    drawn positions of each row masked, ``t ~ U(0, 1)`` (or the masked share fixed to ``ratio``)."""
    B, L = x0.shape
    t = torch.rand(B, generator=generator, dtype=torch.float64)
    share = 1.0 - schedule.alpha(t) if ratio is None else torch.full((B,), float(ratio))
    count = (share * L).round().clamp(1, L).long()
    scores = torch.rand(B, L, generator=generator)
    rank = scores.argsort(-1).argsort(-1)  # a uniformly random permutation per row
    masked = (rank < count.unsqueeze(1)).to(x0.device)
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return x_t, masked, t.float().to(x0.device)


class ImagePretraining(pl.LightningModule):
    """Train a ``MeissonicClassTransformer`` on VQ token grids (see the module docstring).

    Args:
        transformer: the class-conditional network (its ``codebook_size`` must equal the VQ's).
        vq: the frozen tokenizer: a ``VQTokenizer``, a folder of one, or ``None`` (token batches;
            no validation images).
        grid_shape: ``(h, w)`` of the grids (default: the VQ's).
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up, then constant.
        schedule: the mask schedule ``alpha(t)`` (``"maskgit_cosine"``).
        class_dropout: probability that a training label becomes the null class.
        seed: seeds every draw (per step).
        num_grid_images: validation grids shown in the image grid.
        export_dir: where the image model is written at the end of fit (``None``:
            ``<default_root_dir>/image_model``).
    """

    def __init__(
        self,
        transformer: MeissonicClassTransformer,
        vq: VQTokenizer | str | None = None,
        grid_shape: tuple[int, int] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        schedule: str = "maskgit_cosine",
        class_dropout: float = 0.1,
        seed: int = 0,
        num_grid_images: int = 10,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(transformer, MeissonicClassTransformer):
            raise TypeError(
                f"transformer must be a MeissonicClassTransformer, got {type(transformer).__name__}"
            )
        if isinstance(vq, str | Path):
            if str(vq) == "embedded":  # the packaged tokenizer (lightning_smc/assets)
                from ..models.loading import ASSETS

                vq = ASSETS / "vq_fmnist_tiny"
            if not Path(vq).is_dir():
                raise FileNotFoundError(
                    f"vq={str(vq)!r} is not a folder: train the tokenizer first (python -m "
                    "lightning_smc.fit --config configs/pretrain/vq_fmnist_tiny.yaml writes "
                    "outputs/vq_fmnist_tiny/vq) or give a VQTokenizer class_path"
                )
            vq = VQTokenizer.from_pretrained(vq)
        _check(transformer, vq, grid_shape, lr, weight_decay, warmup_steps, class_dropout)
        self.save_hyperparameters(ignore=["transformer", "vq"])
        grid = tuple(grid_shape) if grid_shape is not None else vq.grid_shape
        self.denoiser = MeissonicDenoiser(transformer, grid)
        self.vq = vq
        if vq is not None:
            vq.requires_grad_(False).eval()
        self.schedule = get_schedule(schedule)
        self.null_class = transformer.null_class
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()
        self._noted = False

    # ---- data -----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.vq is not None:
            self.vq.eval()  # frozen (no dropout or norm statistics move)
        return self

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(dm, "num_classes", None)
        if classes is not None and classes != self.null_class:
            raise ValueError(
                f"the data module has {classes} classes but the transformer num_classes="
                f"{self.null_class}"
            )

    @torch.no_grad()
    def tokens_and_labels(self, batch) -> tuple[Tensor, Tensor]:
        """``(x0 [B, h * w] codebook ids, labels [B])`` of an ``(images or grids, labels)`` batch."""
        data, labels = batch[0], batch[1]
        if data.dtype.is_floating_point:
            if self.vq is None:
                raise ValueError(
                    "ImagePretraining got image batches but no vq: give vq: <VQTokenizer folder> "
                    "(e.g. outputs/vq_fmnist_tiny/vq) or pre-tokenized grids"
                )
            data = self.vq.encode(data)
        x0 = data.reshape(data.shape[0], -1).long()
        if x0.shape[1] != math.prod(self.denoiser.grid_shape):
            raise ValueError(
                f"grids of {x0.shape[1]} tokens do not match grid_shape {self.denoiser.grid_shape}"
            )
        return x0, labels.long().reshape(-1)

    def _generator(self, *stage: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.hparams.seed, *stage))

    def drop_labels(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Labels with each replaced by the null class with probability ``class_dropout``."""
        drop = torch.rand(labels.shape, generator=generator) < self.hparams.class_dropout
        return torch.where(drop.to(labels.device), self.null_class, labels)

    # ---- objective ------------------------------------------------------------------------------
    def masked_loss(
        self, x0: Tensor, labels: Tensor, generator: torch.Generator, ratio: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(loss, masked-token accuracy, x_t, logits [B, L, K])`` of one masked batch."""
        x_t, masked, t = mask_grids(x0, self.denoiser.mask_id, self.schedule, generator, ratio)
        logits = self.denoiser.network(x_t, t, labels)  # [B, L, K]: the codebook only
        loss = F.cross_entropy(logits[masked].float(), x0[masked])
        accuracy = (logits[masked].argmax(-1) == x0[masked]).float().mean()
        return loss, accuracy, x_t, logits

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, labels = self.tokens_and_labels(batch)
        g = self._generator(0, self.global_step, self.global_rank)
        loss, accuracy, _, _ = self.masked_loss(x0, self.drop_labels(labels, g), g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/masked_accuracy", accuracy)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x0, labels = self.tokens_and_labels(batch)
        loss, accuracy, _, _ = self.masked_loss(x0, labels, self._generator(1, batch_idx))
        self.val_loss.update(loss, weight=len(x0))
        self.val_accuracy.update(accuracy, weight=len(x0))
        # the first batch, while an EMA callback's weights are swapped in (they are swapped back
        # before on_validation_epoch_end reaches the module)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            n = self.hparams.num_grid_images
            self.log_fill_in(x0[:n], labels[:n])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/masked_accuracy", self.val_accuracy.compute())
        self.val_loss.reset()
        self.val_accuracy.reset()

    # ---- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fill_in_grid(self, x0: Tensor, labels: Tensor) -> Tensor:
        """Rows: VQ reconstruction of ``x0``, half masked (grey cells), argmax fill-in."""
        g = self._generator(2)
        _, _, x_t, logits = self.masked_loss(x0, labels, g, ratio=0.5)
        masked = x_t == self.denoiser.mask_id
        filled = torch.where(masked, logits.argmax(-1), x0)
        shown = torch.where(masked, torch.zeros_like(x0), x0)
        images = [self.vq.decode(x) for x in (x0, shown, filled)]
        h, w = self.denoiser.grid_shape
        cells = masked.view(-1, 1, h, w).float()
        cover = F.interpolate(cells, size=images[1].shape[-2:], mode="nearest").bool()
        images[1] = torch.where(cover, torch.full_like(images[1], 0.5), images[1])
        return image_grid(torch.cat(images).cpu(), nrow=len(x0))

    def log_fill_in(self, x0: Tensor, labels: Tensor) -> None:
        if self.vq is None:
            if not self._noted:
                rank_zero_info("ImagePretraining: no vq given, so no validation image grids")
                self._noted = True
            return
        grid = self.fill_in_grid(x0, labels)
        root = Path(self.trainer.default_root_dir) / "images"
        save_png(grid, root / f"fill_in_step{self.global_step:07d}.png")
        log_image = getattr(self.logger, "log_image", None)  # WandbLogger
        if callable(log_image):
            caption = "rows: VQ reconstruction, half masked, argmax fill-in"
            log_image("val/fill_in", [to_png_array(grid)], step=self.global_step, caption=[caption])

    # ---- optimisation and export ----------------------------------------------------------------
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

    def image_model(self) -> ImageModel:
        return ImageModel(self.denoiser, self.vq)

    def on_fit_end(self) -> None:
        """Write the image model folder (nothing when no optimizer step was taken)."""
        if not self.trainer.is_global_zero or self.trainer.global_step == 0:
            if self.trainer.global_step == 0:
                rank_zero_warn("fit took no optimizer step: the model is untrained, not exported")
            return
        root = self.hparams.export_dir or Path(self.trainer.default_root_dir) / "image_model"
        out = self.image_model().save_pretrained(root)
        print(f"exported the trained image model to {out}")


def _check(transformer, vq, grid_shape, lr, weight_decay, warmup_steps, class_dropout) -> None:
    K = transformer.config.codebook_size
    checks = [
        (vq is not None or grid_shape is not None, "give vq (a VQTokenizer) or grid_shape"),
        (
            vq is None or vq.codebook_size == K,
            f"the VQ has {getattr(vq, 'codebook_size', None)} codes, the transformer "
            f"codebook_size={K}",
        ),
        (
            vq is None or grid_shape is None or tuple(grid_shape) == vq.grid_shape,
            f"grid_shape={grid_shape} differs from the VQ's {getattr(vq, 'grid_shape', None)}",
        ),
        (math.isfinite(lr) and lr > 0, f"lr={lr} must be a finite number > 0"),
        (weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0"),
        (warmup_steps >= 0, f"warmup_steps={warmup_steps} must be >= 0"),
        (0 <= class_dropout < 1, f"class_dropout={class_dropout} must lie in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
