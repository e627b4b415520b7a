"""The start of one ``SMCSampler`` run: batch size and device, per-prompt generators, the
initial rows, the networks whose per-row state follows the particles, and ``RunState`` (what
the loop carries from step to step). Notation as in ``sampler``: ``B`` prompts, ``n`` particles
of each held here, rows ``x [B * n, L]``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..smc import RowGenerators
from .checks import WeightGuard
from .trace import PathRecorder, Trace

__all__ = [
    "RunState",
    "batch_and_device",
    "initial_state",
    "row_generators",
    "stateful_networks",
]


def batch_and_device(denoiser: Any, batch_size, prompt, generator, device):
    """``(B, device)``: ``B`` from ``batch_size``, the prompt's rows or the number of
    generators (else 1); the device from the prompt or the denoiser's parameters."""
    B = batch_size
    if prompt is not None:
        if prompt.dim() != 2:
            raise ValueError(
                f"prompt must be a LongTensor [batch, prompt_len], got shape {tuple(prompt.shape)}"
            )
        if B is not None and prompt.shape[0] != B:
            raise ValueError(f"batch_size={B} but prompt has {prompt.shape[0]} rows")
        B = prompt.shape[0]
    if B is None:
        B = len(generator) if isinstance(generator, Sequence) else 1
    if B < 1:
        raise ValueError(f"batch_size must be >= 1, got {B}")
    if device is None:
        device = prompt.device if prompt is not None else _module_device(denoiser)
    return B, torch.device(device)


def row_generators(generator, B: int, device) -> RowGenerators:
    """One generator per prompt: the ones given, or ``B`` split off one generator."""
    if isinstance(generator, Sequence):
        if len(generator) != B:
            raise ValueError(
                f"got {len(generator)} generators for {B} prompts; pass one per prompt or a single one"
            )
        return RowGenerators(list(generator))
    return RowGenerators.split(generator, B, device)


def initial_state(
    denoiser: Any, seq_len: int, B: int, prompt: Tensor | None, device, particles: int
) -> tuple[Tensor, int]:
    """Fully masked rows (prompt in front), ``particles`` rows per prompt, and the first
    generated position."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    mask_id, V = denoiser.mask_id, denoiser.vocab_size
    x = torch.full((B, seq_len), mask_id, dtype=torch.long, device=device)
    start = 0
    if prompt is not None:
        if prompt.shape[1] >= seq_len:
            raise ValueError(
                f"prompt length {prompt.shape[1]} leaves nothing to generate with seq_len={seq_len}"
            )
        if prompt.min() < 0 or prompt.max() >= V:
            raise ValueError(f"prompt token ids must be in [0, vocab_size={V})")
        x[:, : prompt.shape[1]] = prompt.to(device)
        # Generation starts at the first free position of any prompt: masked prompt entries
        # are generated (infilling, infill=True); blocks tile [start, seq_len).
        start = int((x == mask_id).any(0).nonzero()[0])
    return x.repeat_interleave(particles, dim=0), start


def stateful_networks(denoiser: Any, potential: Any, proposal: Any) -> list[Any]:
    """The networks of a run that keep per-row state (``reorder_state``), each once: the
    denoiser and those the potential and proposal declare (``networks()``)."""
    networks = [denoiser, *potential.networks()]
    if proposal is not None:
        networks += list(proposal.networks())
    found: dict[int, Any] = {}
    for net in networks:
        if callable(getattr(net, "reorder_state", None)):
            found.setdefault(id(net), net)
    return list(found.values())


@dataclass
class RunState:
    """The state of one run: rows ``x``, log-weights, the twist ``log gamma`` of the rows,
    the diagnostics, the recorded path, the extra network evaluations, the weight guard, the
    whole-trajectory log-confidence of each particle and the steps run."""

    x: Tensor
    log_w: Tensor
    twist: Tensor
    trace: Trace
    path: PathRecorder | None
    extra_evals: int = 0
    guard: WeightGuard | None = None  # checks log_w after every increment (sampling.checks)
    log_confidence: Tensor | None = None  # [B, N] float64: the lineage's committed log p
    steps: int = 0  # steps whose network was evaluated

    @classmethod
    def start(cls, x: Tensor, B: int, N: int, T: int, record_path: bool) -> RunState:
        trace = Trace.empty(B, N, T, x.device)
        twist = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        path = PathRecorder() if record_path else None
        run = cls(x, trace.new_weights(), twist, trace, path)
        run.log_confidence = trace.new_weights()
        return run


def _module_device(denoiser: Any) -> torch.device:
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")
