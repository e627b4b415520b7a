"""What the sampler checks about what it is given, once per call and cheaply (issue 12).

Every check here either passes silently or raises an error that names the argument (or the
denoiser, the step and the term) and says how to fix it. None of them reads a ``[R, L, V]``
tensor more than once per run:

- **arguments** (``check_count``, ``check_finite``, ``check_sample_args``, ``check_cond``,
  ``check_strategy``): integer ``num_particles`` / ``num_steps`` / ``seq_len`` / ``batch_size``
  (``bool`` and ``float`` refused), finite floats (``alpha``, ``beta``, ``temperature`` …), a
  ``torch.Generator`` or a sequence of them, an integer prompt tensor (a float or bool tensor
  would be truncated to ids), a prompt with the mask token only with ``infill=True``, a
  ``cond`` whose tensors have the prompts' batch size, ``ess_threshold`` and ``resample_when``
  not both given;
- **the denoiser's output at the first forward of a run** (``check_denoiser_output``): shape
  ``[R, L, vocab_size]``, a floating dtype, no NaN / ``+inf`` on a few sampled positions, and,
  for a denoiser that declares ``outputs_log_probs = True``, ``logsumexp ≈ 0`` there within
  ``log_prob_tolerance(dtype, V)``;
- **the log-weights after every increment** (``WeightGuard``): NaN and ``+inf`` never arise by
  design (``-inf`` does: a particle the target gives probability 0), and every prompt keeps at
  least one particle of finite weight. Otherwise ``WeightError`` names the step and the term
  (``twist``, ``move`` = potential target minus proposal ``log q``, ``final twist``). Cost: a
  few elementwise operations on ``[B, N]`` and one host sync per increment.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "WeightError",
    "WeightGuard",
    "check_cond",
    "check_count",
    "check_denoiser_output",
    "check_finite",
    "check_sample_args",
    "check_strategy",
    "log_prob_tolerance",
]


class WeightError(ValueError):
    """A log-weight became NaN or ``+inf``, or every particle of a prompt reached weight 0;
    the message names the step and the term that produced it."""


# ---------------------------------------------------------------------- arguments
def check_count(value: Any, name: str, minimum: int = 1, owner: str = "") -> int:
    """``value`` as an ``int >= minimum`` (an ``int``-like: not ``bool``, not ``float``)."""
    where = f"{owner}: " if owner else ""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{where}{name} must be an integer, got {value!r} ({type(value).__name__})"
        ) from None
    if number < minimum:
        raise ValueError(f"{where}{name} must be >= {minimum}, got {number}")
    return number


def check_finite(
    value: Any,
    name: str,
    owner: str = "",
    *,
    minimum: float | None = None,
    positive: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite ``float`` (``> 0`` with ``positive``, ``>= minimum`` with one)."""
    where = f"{owner} " if owner else ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or not math.isfinite(number):
        kind = "a finite number" + (" > 0" if positive else "")
        if minimum is not None:
            kind += f" >= {minimum}"
        raise ValueError(f"{where}{name} must be {kind}{hint}, got {value!r}")
    if positive and not number > 0:
        raise ValueError(f"{where}{name} must be > 0{hint}, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{where}{name} must be >= {minimum}{hint}, got {value!r}")
    return number


def check_strategy(ess_threshold: float | None, resample_when: Any) -> str | Any:
    """The resampling strategy spec: ``resample_when`` or ``ess:<ess_threshold>`` (default 0.5);
    both given is refused (``ess_threshold`` would be ignored)."""
    if resample_when is not None and ess_threshold is not None:
        raise ValueError(
            f"ess_threshold={ess_threshold!r} and resample_when={resample_when!r} were both given, "
            "but resample_when replaces the ESS rule; pass one of them (e.g. "
            f"resample_when='ess:{ess_threshold}' or 'block:{ess_threshold}')"
        )
    if resample_when is not None:
        return resample_when
    threshold = 0.5 if ess_threshold is None else ess_threshold
    check_finite(threshold, "ess_threshold", hint=" in (0, 1]")
    return f"ess:{threshold}"


def _is_generator_sequence(generator: Any) -> bool:
    return isinstance(generator, Sequence) and not isinstance(generator, str | bytes)


def check_sample_args(
    seq_len: Any,
    batch_size: Any,
    prompt: Any,
    generator: Any,
    mask_id: int,
    infill: bool = False,
) -> None:
    """Types of ``sample``'s arguments; a prompt holding the mask token needs ``infill=True``."""
    check_count(seq_len, "seq_len")
    if batch_size is not None:
        check_count(batch_size, "batch_size")
    if not (
        generator is None
        or isinstance(generator, torch.Generator)
        or (
            _is_generator_sequence(generator)
            and all(isinstance(g, torch.Generator) for g in generator)
        )
    ):
        raise TypeError(
            f"generator must be a torch.Generator or a sequence of them (one per prompt), got "
            f"{generator!r} ({type(generator).__name__}); e.g. "
            "generator=torch.Generator().manual_seed(0)"
        )
    if prompt is None:
        return
    if not isinstance(prompt, Tensor):
        raise TypeError(
            f"prompt must be a torch.Tensor of token ids [batch, prompt_len], got "
            f"{type(prompt).__name__}; e.g. prompt=torch.tensor(ids)"
        )
    if prompt.dtype == torch.bool or prompt.is_floating_point() or prompt.is_complex():
        raise TypeError(
            f"prompt must be an integer tensor of token ids (torch.long), got dtype "
            f"{prompt.dtype}: its values would be truncated to ids; convert ids explicitly "
            "(prompt.long()) if that is what you mean"
        )
    if not infill and prompt.dim() == 2 and bool((prompt == mask_id).any()):
        where = (prompt == mask_id).nonzero()[0].tolist()
        raise ValueError(
            f"prompt holds the mask token (mask_id={mask_id}), first at [row, position] = "
            f"{where}: those positions would be generated (infilling). Pass infill=True if that "
            "is what you mean, or remove the mask token from the prompt"
        )


def _batch_leaves(value: Any, path: str):
    if isinstance(value, Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _batch_leaves(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _batch_leaves(item, f"{path}[{i}]")


def check_cond(cond: Any, batch: int) -> None:
    """Every tensor of ``cond`` (a tensor, or a dict / list of them) has ``batch`` rows."""
    for path, tensor in _batch_leaves(cond, "cond"):
        rows = tensor.shape[0] if tensor.dim() else None
        if rows != batch:
            got = "a scalar (no batch dimension)" if rows is None else f"{rows} rows"
            raise ValueError(
                f"{path} has shape {tuple(tensor.shape)}: {got}, but there are {batch} prompts; "
                f"cond must be [batch={batch}, ...] (one entry per prompt; the sampler expands it "
                "to the particles)"
            )


# ---------------------------------------------------------------------- the denoiser's output
def log_prob_tolerance(dtype: torch.dtype, vocab_size: int) -> float:
    """How far ``logsumexp`` of declared log-probabilities may be from 0: rounding each entry
    of ``log p`` to ``dtype`` moves ``sum p`` by at most ``eps / 2 * H <= eps / 2 * log V``
    (``H`` the entropy); 8 times that, and at least 1e-4 (a float32 ``log_softmax`` rounds at
    the scale of its logits). Logits are almost never normalized to within that."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(8 * eps * (math.log(max(vocab_size, 2)) + 1), 1e-4)


def _sample_positions(output: Tensor, count: int = 8) -> Tensor:
    """A few ``[V]`` rows of ``output [R, L, V]`` (first and last particle row, ``count``
    evenly spaced positions), as float64 ``[k, V]``."""
    R, L = output.shape[0], output.shape[1]
    rows = sorted({0, R - 1})
    positions = sorted({round(i * (L - 1) / max(count - 1, 1)) for i in range(min(count, L))})
    at = torch.tensor(rows, device=output.device).unsqueeze(1), torch.tensor(positions)
    return output[at[0], at[1].to(output.device)].reshape(-1, output.shape[-1]).double()


def check_denoiser_output(denoiser: Any, output: Any, x_t: Tensor) -> None:
    """The first output of a run: shape ``[R, L, vocab_size]``, floating, no NaN / ``+inf`` on
    a few positions, normalized there if the denoiser declares ``outputs_log_probs``."""
    name = type(denoiser).__name__
    V = denoiser.vocab_size
    expected = (*x_t.shape, V)
    if not isinstance(output, Tensor):
        raise TypeError(
            f"denoiser {name} returned {type(output).__name__}; it must return a tensor of "
            f"logits [R, L, vocab_size] = {list(expected)}"
        )
    if tuple(output.shape) != expected:
        why = ""
        if output.dim() == 3 and output.shape[:2] == x_t.shape:
            why = (
                f": {output.shape[-1]} vocabulary columns but vocab_size={V} (the logits must "
                "cover every id, the mask included)"
            )
        elif output.dim() == 3 and output.shape[1] != x_t.shape[1]:
            why = f": {output.shape[1]} positions for inputs of length {x_t.shape[1]}"
        raise ValueError(
            f"denoiser {name} returned shape {list(output.shape)}, expected [R, L, vocab_size] = "
            f"{list(expected)}{why}"
        )
    if not output.is_floating_point():
        raise TypeError(f"denoiser {name} returned dtype {output.dtype}; logits must be floating")
    sample = _sample_positions(output)
    if bool((torch.isnan(sample) | torch.isposinf(sample)).any()):
        raise ValueError(
            f"denoiser {name} returned NaN or +inf logits (seen on the first forward); "
            "check the model's weights and inputs"
        )
    if not bool(getattr(denoiser, "outputs_log_probs", False)):
        return
    tolerance = log_prob_tolerance(output.dtype, V)
    total = sample.logsumexp(-1).abs()
    without_mask = sample.clone()
    without_mask[:, denoiser.mask_id] = -torch.inf
    total = torch.minimum(total, without_mask.logsumexp(-1).abs())
    if not bool((total <= tolerance).all()):
        worst = float(total.max())
        raise ValueError(
            f"denoiser {name} declares outputs_log_probs = True but returns logits, not "
            f"log-probabilities: |logsumexp| over the vocabulary is {worst:.4g} on sampled "
            f"positions (tolerance {tolerance:.2g} for {output.dtype}, V={V}); return "
            "log_softmax(logits) or set outputs_log_probs = False"
        )


# ---------------------------------------------------------------------- log-weights
_TERMS = {
    "twist": "the potential's twist log gamma_t(x_t) - log gamma_prev",
    "move": (
        "the move weight (the potential's target exponent * log p_theta + offset minus the "
        "proposal's log q: the potential or the proposal correction; NaN log-probabilities "
        "from a denoiser end up here too)"
    ),
    "final twist": "the potential's final twist log gamma_0(x_0) - log gamma_prev",
}


class WeightGuard:
    """Checks ``log_w [B, N]`` after every increment of one run (see the module docstring).

    ``check(log_w, increment, term)`` after ``layout.add``; ``step`` is set by the loop. With
    particles on one process ``log_w`` is up to date and is checked at once; with sharded
    particles the local ``increment`` is checked (its first bad term is remembered) and the
    global ``log_w`` at ``settled`` (every rank sees the same ``log_w``, so all raise together)."""

    def __init__(self, layout: Any, potential: Any = None, proposal: Any = None):
        self.local = getattr(layout, "world_size", 1) == 1
        self.step = 0
        self.source = f"potential {type(potential).__name__}" + (
            f", proposal {type(proposal).__name__}" if proposal is not None else ""
        )
        self._culprit: tuple[int, str] | None = None

    def check(self, log_w: Tensor, increment: Tensor, term: str) -> None:
        if self.local:
            self._check(log_w, (self.step, term))
        elif self._culprit is None and bool(
            (torch.isnan(increment) | torch.isposinf(increment)).any()
        ):
            self._culprit = (self.step, term)

    def settled(self, log_w: Tensor) -> None:
        if not self.local:
            self._check(log_w, self._culprit or (self.step, "an increment on another rank"))

    def _check(self, log_w: Tensor, culprit: tuple[int, str]) -> None:
        bad = torch.isnan(log_w) | torch.isposinf(log_w)
        alive = (log_w > -torch.inf).any(-1)
        if bool(bad.any() | ~alive.all()):
            self._raise(log_w, bad, alive, *culprit)

    def _raise(self, log_w: Tensor, bad: Tensor, alive: Tensor, step: int, term: str) -> None:
        what = _TERMS.get(term, term)
        at = f"step {step}" if term != "final twist" else "the end of the run"
        if bool(bad.any()):
            b, n = bad.nonzero()[0].tolist()
            value = float(log_w[b, n])
            raise WeightError(
                f"log-weight became {value} at {at} (prompt {b}, particle {n}), produced by "
                f"{what} [{self.source}]. Typical causes: a non-finite twist schedule, a reward "
                "so large for its alpha that r / alpha overflows, a SelfReward beta so large "
                "that beta * log p overflows, or NaN outputs of a denoiser"
            )
        b = int((~alive).nonzero()[0])
        raise WeightError(
            f"every particle of prompt {b} has log-weight -inf (probability 0 under the target) "
            f"at {at}, after {what} [{self.source}]: nothing is left to resample. Typical causes: "
            "a SelfReward beta so large that (1 + beta) * log p underflows to -inf, a product "
            "target whose two denoisers share no support, or a proposal that only proposes "
            "tokens the target excludes"
        )
