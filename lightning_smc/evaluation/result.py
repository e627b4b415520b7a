"""``MethodResult``: the answers of one method over a set of prompts, their scores and diagnostics.

Notation: ``S`` answers (prompts), ``N`` particles, ``T`` steps, ``L`` tokens. A result holds
per answer its global prompt index, tokens, decoded text, reward / holdout scores, ``log Ẑ``,
final particle log-weights and the ESS / resampling traces. Results of several batches or
processes join with ``MethodResult.merge`` (in prompt order); ``summary`` computes the named
metrics (``metrics.registry``). Example::

    parts = [run_method(method, denoiser, shard=(rank, 3), ...) for rank in range(3)]
    whole = MethodResult.merge(parts)
    whole.summary(metrics=["reward", "ess", "log_z"])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MethodResult"]


@dataclass
class MethodResult:
    """What ``run_method`` returns: one answer per prompt, its scores and its diagnostics.

    Per answer: ``index [S]`` the global prompt indices (``range(num_samples)``, or this
    process's shard of it); ``tokens [S, L]``; ``texts`` (decoded); ``reward`` / ``holdout
    [S]`` float64 (``None`` without that scorer); ``log_normalizer [S]`` (``log Ẑ``);
    ``log_weights [S, N]`` the final normalized particle log-weights; ``ess_trace [S, T]`` the
    ESS after each step and ``resampled [S, T]`` whether a resample followed; ``overtakes
    [S]``; ``sample_nfe [S]`` network evaluations per particle sequence; ``sample_seconds [S]``
    sampling wall time (of its batch, shared equally).

    ``ess`` (mean ESS / N), ``nfe`` and ``seconds`` are the means over answers."""

    name: str
    index: Tensor
    tokens: Tensor
    texts: list[str]
    reward: Tensor | None
    holdout: Tensor | None
    log_normalizer: Tensor
    log_weights: Tensor
    ess_trace: Tensor
    resampled: Tensor
    overtakes: Tensor
    sample_nfe: Tensor
    sample_seconds: Tensor
    num_particles: int

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @classmethod
    def empty(cls, name: str, num_particles: int, num_steps: int, seq_len: int) -> MethodResult:
        """No answers, with every field's shape (an empty shard)."""
        f64 = torch.float64
        return cls(
            name=name,
            index=torch.empty(0, dtype=torch.long),
            tokens=torch.empty(0, seq_len, dtype=torch.long),
            texts=[],
            reward=None,
            holdout=None,
            log_normalizer=torch.empty(0, dtype=f64),
            log_weights=torch.empty(0, num_particles, dtype=f64),
            ess_trace=torch.empty(0, num_steps, dtype=f64),
            resampled=torch.empty(0, num_steps, dtype=torch.bool),
            overtakes=torch.empty(0, dtype=torch.long),
            sample_nfe=torch.empty(0, dtype=f64),
            sample_seconds=torch.empty(0, dtype=f64),
            num_particles=num_particles,
        )

    @property
    def ess(self) -> float:
        """Mean over answers and steps of ESS / N."""
        return float((self.ess_trace.double().mean(-1) / self.num_particles).mean())

    @property
    def nfe(self) -> float:
        """Mean network evaluations per particle sequence."""
        return float(self.sample_nfe.double().mean())

    @property
    def seconds(self) -> float:
        """Mean sampling wall time per answer."""
        return float(self.sample_seconds.double().mean())

    @property
    def weights(self) -> Tensor:
        """Final normalized particle weights ``[S, N]``."""
        return self.log_weights.exp()

    def summary(
        self,
        success_threshold: float | None = None,
        metrics: str | list[str] | None = None,
        gen_ppl_model: str = "smollm2",
    ) -> dict[str, float]:
        """The named metrics of these answers in this process (``metrics.MetricSet``;
        ``None``: the defaults). ``success`` is ``reward > success_threshold``."""
        from ..metrics.registry import MetricSet

        metric_set = MetricSet(
            metrics,
            reward=self.reward is not None,
            holdout=self.holdout is not None,
            success_threshold=success_threshold,
            gen_ppl_model=gen_ppl_model,
            sync=False,
        )
        metric_set.update(self)
        return metric_set.compute()

    def cpu(self) -> MethodResult:
        """A copy with every tensor on the CPU (to pickle or gather)."""
        moved = {
            k: (v.cpu() if isinstance(v, Tensor) else v)
            for k, v in ((f, getattr(self, f)) for f in self.__dataclass_fields__)
        }
        return MethodResult(**moved)

    def select(self, rows: list[int]) -> MethodResult:
        """The answers at positions ``rows`` (e.g. ``[]``: none, with every field's shape)."""
        at = torch.tensor(rows, dtype=torch.long)

        def pick(value):
            if isinstance(value, Tensor):
                return value[at.to(value.device)]
            if isinstance(value, list):
                return [value[i] for i in rows]
            return value

        return MethodResult(**{f: pick(getattr(self, f)) for f in self.__dataclass_fields__})

    @classmethod
    def merge(cls, parts: list[MethodResult]) -> MethodResult:
        """The answers of ``parts`` (batches or shards of one method's prompts) in prompt order.
        A prompt in two parts is an error."""
        if not parts:
            raise ValueError("MethodResult.merge needs at least one part")
        names = {p.name for p in parts}
        if len(names) != 1:
            raise ValueError(f"MethodResult.merge: parts of different methods {sorted(names)}")
        filled = [p for p in parts if len(p)] or parts[:1]
        index = torch.cat([p.index for p in filled])
        order = torch.argsort(index, stable=True)
        if (index[order][1:] == index[order][:-1]).any():
            raise ValueError("MethodResult.merge: a prompt index appears in more than one part")

        def join(field: str):
            values = [getattr(p, field) for p in filled]
            if values[0] is None:
                if any(v is not None for v in values):
                    raise ValueError(f"MethodResult.merge: {field} is missing in some parts")
                return None
            if isinstance(values[0], list):
                flat = [item for v in values for item in v]
                return [flat[i] for i in order.tolist()]
            return torch.cat(values)[order]

        return cls(
            **{f: join(f) for f in cls.__dataclass_fields__ if f not in ("name", "num_particles")},
            name=parts[0].name,
            num_particles=parts[0].num_particles,
        )
