"""``python -m lightning_smc.fit --config FILE``: train anything in the framework (LightningCLI).

Configs use ``class_path`` / ``init_args`` for the model (a LightningModule from
``lightning_smc.modules``) and the data (a LightningDataModule from ``lightning_smc.data``);
``--print_config`` prints the resolved config and any field can be overridden on the command
line (``--trainer.max_steps 10``). Defaults: W&B logging offline into ``./wandb/`` (set
``WANDB_MODE=online`` or ``--trainer.logger.init_args.offline false`` to upload), Lightning's
rich progress bar, ``ModelCheckpoint``. After ``fit``, a model that has a ``denoiser`` with
``save_pretrained`` is exported in Hugging Face format to ``<trainer.default_root_dir>/hf`` (with the data
module's tokenizer when it has one). A fit that took no optimizer step (``--trainer.max_steps 0``,
an empty train loader) exports nothing and exits with status 1: its weights are untrained.
Checkpoints (``--ckpt_path``) are read with ``weights_only=True`` and errors that name the file; a
sampling config (``configs/methods/...``) is refused with the ``sample`` command to run instead.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import lazy_instance
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .models.loading import read_checkpoint
from .models.tokenizer import save_tokenizer

__all__ = ["SMCLightningCLI", "SafeCheckpointIO", "main"]

SUBCOMMANDS = {"fit", "validate", "test", "predict"}
#: top-level keys of ``sample`` configs (method, comparison), never of a training config
SAMPLING_KEYS = {"method", "methods", "runs"}

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


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, reading local files through ``read_checkpoint``: tensors and
    plain containers only (``weights_only=True``), and errors that name the file."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"--ckpt_path {path}: --weights_only false is not supported; checkpoints are "
                "read as tensors and plain containers only: leave --weights_only unset"
            )
        if not Path(path).exists():  # a remote (fsspec) path: Lightning's loader, weights only
            return super().load_checkpoint(path, map_location, weights_only=True)
        checkpoint = read_checkpoint(path)
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint")
        return checkpoint


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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters with a bare torch.load(weights_only=True);
        # a file it cannot read is read again here for an error that names it.
        try:
            super()._parse_ckpt_path()
            return
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
            failure = err
        read_checkpoint(self.config[self.config.subcommand].get("ckpt_path"))
        raise failure

    def _instantiate_trainer(self, config, callbacks):
        # --trainer.enable_progress_bar false turns the always-added progress bar off too
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        trainer = super()._instantiate_trainer(config, callbacks)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a custom one
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def after_fit(self) -> None:
        if self.trainer.global_step == 0:
            if self.trainer.is_global_zero:
                print(
                    "error: fit took no optimizer step (global_step=0: --trainer.max_steps 0, "
                    "max_epochs 0, limit_train_batches 0 or an empty train loader), so the "
                    "weights are untrained and nothing was exported (no hf/, reward/ or "
                    "adapter/ folder). Give --trainer.max_steps > 0 to train; to evaluate "
                    "without training run the `validate` subcommand.",
                    file=sys.stderr,
                )
            sys.exit(1)
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


def _config_paths(argv: list[str]) -> list[Path]:
    """The files given as ``--config PATH`` / ``--config=PATH`` / ``-c PATH``."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            paths.append(Path(arg.removeprefix("--config=")))
    return paths


def _refuse_sampling_configs(argv: list[str]) -> None:
    """Exit with a hint when a ``--config`` is a ``sample`` config (method or comparison)."""
    for path in _config_paths(argv):
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the CLI reports unreadable files itself
        if not isinstance(cfg, dict):
            continue
        keys = sorted(SAMPLING_KEYS & set(cfg))
        if keys or isinstance(cfg.get("model"), str):
            what = f"top-level {keys[0]!r}" if keys else f"model: {cfg['model']!r}"
            print(
                f"error: {path} is a sampling config ({what}), not a training config; run it "
                f"with\n    python -m lightning_smc.sample --config {path}\nfit takes a config "
                "with trainer / model (a LightningModule class_path) / data, e.g. "
                "configs/pretrain/mdlm_tiny.yaml",
                file=sys.stderr,
            )
            sys.exit(2)


def main(argv: list[str] | None = None) -> SMCLightningCLI:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]
    _refuse_sampling_configs(argv)
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
