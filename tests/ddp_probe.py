"""Callbacks that the distributed tests load into ``python -m lightning_smc.fit`` subprocesses
(through ``PYTHONPATH=tests``): one records every rank's trainable parameters at the end of
fitting, one makes a chosen rank raise during validation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


class ParamDump(pl.Callback):
    """Write ``<directory>/rank<global_rank>.pt``: the trainable parameters, the global step,
    the world size and the logged (rank-averaged) training loss of every step, after fitting."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        params = {
            n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad
        }
        record = {
            "params": params,
            "step": trainer.global_step,
            "world": trainer.world_size,
            "losses": self.losses,
        }
        torch.save(record, self.directory / f"rank{trainer.global_rank}.pt")


class FailOnRank(pl.Callback):
    """Raise ``RuntimeError`` on global rank ``rank`` at the end of validation."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"evaluation failed on rank {self.rank} (FailOnRank)")
