"""``python -m lightning_smc.fit --config FILE``: train anything in the framework (LightningCLI).

Configs use ``class_path`` / ``init_args`` for the model (a LightningModule from
``lightning_smc.modules``) and the data (a LightningDataModule from ``lightning_smc.data``);
``--print_config`` prints the resolved config and any field can be overridden on the command
line (``--trainer.max_steps 10``). Defaults: W&B logging offline into ``./wandb/`` (set
``WANDB_MODE=online`` or ``--trainer.logger.init_args.offline false`` to upload), Lightning's
rich progress bar, ``ModelCheckpoint``. After ``fit``, a model that has a ``denoiser`` with
``save_pretrained`` is exported in Hugging Face format to ``<trainer.default_root_dir>/hf`` (with the data
module's tokenizer when it has one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .models.tokenizer import save_tokenizer

__all__ = ["SMCLightningCLI", "main"]

SUBCOMMANDS = {"fit", "validate", "test", "predict"}

TRAINER_DEFAULTS = {
    "logger": lazy_instance(WandbLogger, save_dir=".", project="lightning_smc", offline=True),
}


def _checkpoint_dir(root: str | None) -> str | None:
    return None if root is None else str(Path(root) / "checkpoints")


class SaveConfigToRootDir(SaveConfigCallback):
    """Save the resolved config as ``<trainer.default_root_dir>/config.yaml`` (beside the
    checkpoints and the HF export), not into the working directory that W&B writes to."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, path, skip_none=False, overwrite=True, multifile=self.multifile
            )
        self.already_saved = True


class SMCLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks, configurable as --checkpoint.* and --progress_bar.*
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # Checkpoints beside the run (Lightning would otherwise nest them under the logger's dir).
        parser.link_arguments(
            "trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir
        )
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")

    def _instantiate_trainer(self, config, callbacks):
        # --trainer.enable_progress_bar false turns the always-added progress bar off too
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        denoiser = getattr(self.model, "denoiser", None)
        if (
            denoiser is None
            or not hasattr(denoiser, "save_pretrained")
            or not self.trainer.is_global_zero
        ):
            return
        out = Path(self.trainer.default_root_dir) / "hf"
        denoiser.save_pretrained(out)
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if tokenizer is not None:
            save_tokenizer(tokenizer, out)
        print(f"exported the trained denoiser to {out}")


def main(argv: list[str] | None = None) -> SMCLightningCLI:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]
    os.environ.setdefault("WANDB_MODE", "offline")
    return SMCLightningCLI(
        pl.LightningModule,
        None,  # any LightningDataModule, or none: modules that roll out the sampler make their own
        subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigToRootDir,
        args=argv,
    )


if __name__ == "__main__":
    main()
