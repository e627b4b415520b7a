"""What one ``SMCSampler`` run records as it goes: the diagnostics (``Trace``) and, with
``record_path=True``, every transition (``PathRecorder``). Shapes as in ``output``: ``B``
prompts, ``N`` particles, ``T`` steps; both become parts of the ``SMCOutput``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..diffusion import StepPlan
from ..smc import ess, log_mean_exp
from .output import SMCOutput, SMCPath

__all__ = ["PathRecorder", "Trace"]


class PathRecorder:
    """Collects ``SMCPath`` transitions; ``twist_to`` of a step is the next twist computed for
    its output (before any resample), or the final twist."""

    def __init__(self) -> None:
        self.x_from, self.x_to, self.t, self.step, self.tw_from, self.tw_to = [], [], [], [], [], []

    def add(self, x_from: Tensor, x_to: Tensor, plan: StepPlan, twist_from: Tensor) -> None:
        self.x_from.append(x_from)
        self.x_to.append(x_to)
        self.t.append(plan.t)
        self.step.append(plan.step)
        self.tw_from.append(twist_from)

    def reached(self, twist: Tensor) -> None:
        """The twist of the last recorded output (pre-resample), once it is known."""
        if len(self.tw_to) < len(self.tw_from):
            self.tw_to.append(twist)

    def finish(self, final_twist: Tensor) -> SMCPath:
        self.reached(final_twist)
        device = self.x_to[-1].device
        return SMCPath(
            torch.stack(self.x_from),
            torch.stack(self.x_to),
            torch.tensor(self.t, dtype=torch.float32, device=device),
            torch.tensor(self.step, dtype=torch.long, device=device),
            torch.stack(self.tw_from),
            torch.stack(self.tw_to),
        )


@dataclass
class Trace:
    """Diagnostics being filled in during a run (see ``SMCOutput``)."""

    ess: Tensor
    resampled: Tensor
    ancestors: Tensor
    pre_best: Tensor
    log_Z: Tensor

    @classmethod
    def empty(cls, B: int, N: int, T: int, device) -> Trace:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            ess=torch.full((B, T), float(N), **f64),
            resampled=torch.zeros(B, T, dtype=torch.bool, device=device),
            ancestors=torch.arange(N, device=device).repeat(B, T, 1),
            pre_best=torch.zeros(B, T, dtype=torch.long, device=device),
            log_Z=torch.zeros(B, **f64),
        )

    def new_weights(self) -> Tensor:
        return torch.zeros(
            self.ancestors.shape[0],
            self.ancestors.shape[2],
            dtype=torch.float64,
            device=self.log_Z.device,
        )

    def finish(self, tokens: Tensor, log_w: Tensor, nfe: float) -> SMCOutput:
        self.ess[:, -1] = ess(log_w)
        self.log_Z += log_mean_exp(log_w)
        out = SMCOutput(
            tokens,
            log_w - torch.logsumexp(log_w, -1, keepdim=True),
            self.log_Z,
            self.ess,
            self.resampled,
            self.ancestors,
            nfe,
            torch.zeros_like(self.log_Z, dtype=torch.long),
        )
        lineage = out.lineage(out.log_weights.argmax(-1))
        out.overtakes = (self.resampled & (lineage != self.pre_best)).sum(-1)
        return out
