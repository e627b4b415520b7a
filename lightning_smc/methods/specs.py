"""Method specs: typed recipes for the potentials and proposals a method builds.

Each spec's fields are exactly the arguments of the class it builds (``target``), less the
late-bound ones (the reward, the base denoiser, the trained LoRA proposal), which
``build(denoiser=, reward=, guide=, amortized=)`` receives from ``build_sampler``. ``SPECS`` is
the registry (name -> spec class); a name alone is the spec with its defaults. Example::

    RewardTiltSpec(alpha=0.1).build(denoiser=d, reward=r, guide=None, amortized=None)
    # == RewardTilt(r, alpha=0.1, schedule="linear", num_samples=1)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..potentials import Potential, ProductTarget, RewardTilt, SelfReward
from ..proposals import DenoiserProposal, GradientProposal, Proposal

__all__ = [
    "SPECS",
    "DenoiserProposalSpec",
    "GradientProposalSpec",
    "PotentialSpec",
    "ProductTargetSpec",
    "ProposalSpec",
    "RewardTiltSpec",
    "SelfRewardSpec",
    "Spec",
    "as_spec",
]

TwistSchedule = Literal["constant", "linear"]


# ------------------------------------------------------------------------------- specs
class Spec:
    """A typed recipe for one class: its fields are that class's own arguments (``target``).

    ``build(denoiser=, reward=, guide=, amortized=)`` makes the object, binding the late
    arguments; ``needs_reward`` says whether the method then needs a reward."""

    target: ClassVar[type]
    needs_reward: ClassVar[bool] = False

    def build(self, *, denoiser: Any, reward: Any, guide: Any, amortized: Any) -> Any:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The ``class_path`` / ``init_args`` form (as in a config file)."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__name__}",
            "init_args": dataclasses.asdict(self),
        }


class PotentialSpec(Spec):
    """A spec of a ``Potential``."""


class ProposalSpec(Spec):
    """A spec of a ``Proposal``."""


@dataclass(frozen=True)
class RewardTiltSpec(PotentialSpec):
    """``RewardTilt(reward, alpha, schedule, num_samples)``: target ``p0 exp(r / alpha)``."""

    alpha: float = 0.1
    schedule: TwistSchedule = "linear"
    num_samples: int = 1
    target: ClassVar[type] = RewardTilt
    needs_reward: ClassVar[bool] = True

    def build(self, *, denoiser: Any, reward: Any, guide: Any, amortized: Any) -> Potential:
        return RewardTilt(
            reward, alpha=self.alpha, schedule=self.schedule, num_samples=self.num_samples
        )


@dataclass(frozen=True)
class SelfRewardSpec(PotentialSpec):
    """``SelfReward(beta)``: SR-SMC, target ``p0^(1 + beta)``."""

    beta: float = 1.0
    target: ClassVar[type] = SelfReward

    def build(self, *, denoiser: Any, reward: Any, guide: Any, amortized: Any) -> Potential:
        return SelfReward(self.beta)


@dataclass(frozen=True)
class ProductTargetSpec(PotentialSpec):
    """``ProductTarget(weight, second_cond)``: target ``p1^w p2^(1 - w)`` with ``p2`` the same
    denoiser under ``second_cond``: classifier-free guidance ``u + w (c - u)`` for ``w > 1``
    (Meissonic's guidance scale is ``w``). ``second_cond``: a class label given to every prompt
    (e.g. a class-conditional model's null class), or ``None``: the denoiser called with
    ``cond=None`` (its unconditional input; a ``MeissonicDenoiser``'s null class)."""

    weight: float = 1.5
    second_cond: int | None = None
    target: ClassVar[type] = ProductTarget

    def build(self, *, denoiser: Any, reward: Any, guide: Any, amortized: Any) -> Potential:
        second = None
        if self.second_cond is not None:  # [1]: shared by every prompt (StepContext.expand)
            device = (
                next(iter(denoiser.parameters())).device
                if hasattr(denoiser, "parameters")
                else None
            )
            second = torch.tensor([self.second_cond], dtype=torch.long, device=device)
        return ProductTarget(self.weight, second_cond=second)


@dataclass(frozen=True)
class GradientProposalSpec(ProposalSpec):
    """``GradientProposal(reward, alpha, schedule, tau, scale, correct)`` (SMCgrad). ``reward``
    is the ``guide`` when one is given (a differentiable surrogate), else the tilt's;
    ``alpha`` / ``schedule`` ``None``: the tilt's."""

    alpha: float | None = None
    schedule: TwistSchedule | None = None
    tau: float = 1.0
    scale: float = 1.0
    correct: bool = True
    target: ClassVar[type] = GradientProposal

    def build(self, *, denoiser: Any, reward: Any, guide: Any, amortized: Any) -> Proposal:
        return GradientProposal(reward=guide, **dataclasses.asdict(self))


@dataclass(frozen=True)
class DenoiserProposalSpec(ProposalSpec):
    """``DenoiserProposal(amortized, correct)`` (SMCamot) with the LoRA proposal passed to
    ``build_sampler``, else ``DenoiserProposal.from_adapter(copy of the base, adapter,
    correct)`` (``adapter``: a folder written by ``AmortizedProposalModule``, ``embedded`` /
    ``embedded_toxicity`` (the packaged text adapters) or ``embedded_image`` (the embedded image model's,
    ``models.image.resolve_image_adapter``)). An adapter trained with guidance proposes with it
    (``_as_trained``)."""

    adapter: str | None = None
    correct: bool = True
    target: ClassVar[type] = DenoiserProposal

    def build(self, *, denoiser: Any, reward: Any, guide: Any, amortized: Any) -> Proposal:
        if amortized is not None:
            return DenoiserProposal(amortized, correct=self.correct)
        if self.adapter is None:
            raise ValueError(
                "DenoiserProposalSpec needs adapter: <folder> (written by "
                "AmortizedProposalModule) or a trained proposal passed as amortized="
            )
        if str(self.adapter) == "embedded_image":
            from ..models.image import resolve_image_adapter

            adapter = resolve_image_adapter(self.adapter)
        else:
            from ..models.loading import resolve_adapter

            adapter = resolve_adapter(self.adapter)
        proposal = DenoiserProposal.from_adapter(
            copy.deepcopy(denoiser), adapter, correct=self.correct
        )
        return _as_trained(proposal, adapter)


def _as_trained(proposal: DenoiserProposal, folder: Any) -> DenoiserProposal:
    """The adapter's ``q_phi`` as it was trained: an adapter trained with classifier-free
    guidance (``guidance`` in its ``lsmc_amortized.json``, written by
    ``AmortizedProposalModule.save_adapter``) proposes from the CFG combination of the adapted
    network's two branches (``models.lora.GuidedDenoiser``). The sampler's ``log p - log q``
    keeps the method's own target either way."""
    import json
    from pathlib import Path

    from ..models.lora import GuidedDenoiser

    record = Path(folder) / "lsmc_amortized.json"
    guidance = json.loads(record.read_text()).get("guidance") if record.is_file() else None
    if guidance is None:
        return proposal
    null = json.loads(record.read_text()).get("null_class")
    return DenoiserProposal(GuidedDenoiser(proposal.denoiser, guidance, null), proposal.correct)


#: the registry: a method-vocabulary name -> its spec class
SPECS: dict[str, type[Spec]] = {
    "tilt": RewardTiltSpec,
    "self_reward": SelfRewardSpec,
    "product": ProductTargetSpec,
    "gradient": GradientProposalSpec,
    "amortized": DenoiserProposalSpec,
}


def as_spec(value: Any, kind: type[Spec], field: str) -> Spec | None:
    """``value`` (a spec, a registry name or ``None``) as a spec of ``kind``."""
    if value is None or isinstance(value, kind):
        return value
    valid = sorted(n for n, c in SPECS.items() if issubclass(c, kind))
    if isinstance(value, str) and value in valid:
        return SPECS[value]()
    raise ValueError(
        f"{field}={value!r} is not a {kind.__name__}; use one of the names {valid}, a spec "
        f"({', '.join(c.__name__ for n, c in SPECS.items() if n in valid)}) or None"
    )
