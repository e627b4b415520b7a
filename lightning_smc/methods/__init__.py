"""Named sampling methods: one ``Method`` = sampler settings + target + proposal + answer rule.

A method names the classes it builds with their own argument names (DESIGN §4, "a role has one
name"). Its ``potential`` and ``proposal`` are typed *specs*: each spec's fields are exactly the
arguments of the class it builds, less the late-bound ones (the reward, the base denoiser, the
trained LoRA proposal), which ``build_sampler`` passes in:

==========================  ==================================================  ===========
spec (``class_path``)       builds                                              name
==========================  ==================================================  ===========
``RewardTiltSpec``          ``RewardTilt(reward, alpha, schedule, num_samples)``  ``tilt``
``SelfRewardSpec``          ``SelfReward(beta)``                                ``self_reward``
``ProductTargetSpec``       ``ProductTarget(weight, second_cond)`` (CFG)        ``product``
``GradientProposalSpec``    ``GradientProposal(guide or the tilt's reward,      ``gradient``
                            alpha, schedule, tau, scale, correct)``
``DenoiserProposalSpec``    ``DenoiserProposal(amortized, correct)``, or         ``amortized``
                            ``DenoiserProposal.from_adapter(copy of base,
                            adapter, correct)``
==========================  ==================================================  ===========

``SPECS`` is the registry (name -> spec class); a name alone (``potential: tilt``, or
``Method(potential="tilt")``) is the spec with its defaults. The papers' methods are presets
(``configs/methods/*.yaml``):

============  ==========================================================================
best-of-N     no potential, ``N`` particles, ``select: reward`` (highest reward)
SMCbase       ``RewardTiltSpec``, base proposal, resampling every k steps
SMCgrad       ``RewardTiltSpec`` + ``GradientProposalSpec`` (a differentiable reward or guide)
SMCamot       ``RewardTiltSpec`` + ``DenoiserProposalSpec`` (a trained LoRA adapter)
Propgrad      SMCgrad with ``num_particles: 1``; Propamot: SMCamot with ``num_particles: 1``
SR-SMC        ``SelfRewardSpec``, resampling when ESS < N/2
============  ==========================================================================

Example (YAML, the ``method:`` block of a method config; the config's top-level ``reward:`` is
bound late)::

    method:
      name: SMCgrad
      num_particles: 8
      num_steps: 32
      resample_when: every:8
      potential: {class_path: RewardTiltSpec, init_args: {alpha: 0.1, schedule: linear}}
      proposal: {class_path: GradientProposalSpec, init_args: {tau: 1.0}}

and the same in Python::

    method = Method(name="SMCgrad", num_particles=8, num_steps=32, resample_when="every:8",
                    potential=RewardTiltSpec(alpha=0.1), proposal=GradientProposalSpec(tau=1.0))
    sampler = build_sampler(method, denoiser, reward=reward, guide=guide)

``build_sampler`` is the one builder: the ``sample`` CLI, the ``RewardEvaluation`` callback and
``AmortizedProposalModule.rollout_sampler`` all make their samplers with it. ``answers(out,
method, reward)`` picks one sequence per prompt. A method config *file* (method + model +
scorers + sizes) is parsed by ``load_method_config``; running it lives in
``lightning_smc.evaluation``. The old spelling (``potential: tilt`` with ``alpha``,
``twist_schedule``, ``twist_samples``; ``proposal: gradient`` with ``gradient_tau``;
``proposal: amortized`` with ``adapter``) is refused with its rewrite (``rewrite_legacy``).
"""

from .config import LEGACY_KEYS, MethodConfig, load_method_config, method_parser, rewrite_legacy
from .method import (
    SELECT_RULES,
    Completions,
    Method,
    answers,
    build_sampler,
    complete_prompts,
    evaluations_per_step,
    match_budget,
)
from .specs import (
    SPECS,
    DenoiserProposalSpec,
    GradientProposalSpec,
    PotentialSpec,
    ProductTargetSpec,
    ProposalSpec,
    RewardTiltSpec,
    SelfRewardSpec,
    Spec,
)

__all__ = [
    "LEGACY_KEYS",
    "SELECT_RULES",
    "SPECS",
    "Completions",
    "DenoiserProposalSpec",
    "GradientProposalSpec",
    "Method",
    "MethodConfig",
    "PotentialSpec",
    "ProductTargetSpec",
    "ProposalSpec",
    "RewardTiltSpec",
    "SelfRewardSpec",
    "Spec",
    "answers",
    "build_sampler",
    "complete_prompts",
    "evaluations_per_step",
    "load_method_config",
    "match_budget",
    "method_parser",
    "rewrite_legacy",
]
