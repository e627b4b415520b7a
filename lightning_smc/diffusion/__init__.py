"""Masked-diffusion math: schedules ``alpha(t)``, unmasking policies and step plans, remasking kernels (ReMDM), and
categorical sampling (float64 Gumbel-max, one-uniform inverse CDF, temperature, top-p). DESIGN.md §3 fixes the
conventions: ``t = 1`` fully masked, ``alpha(0) = 1``, the mask token is never drawn and clean
tokens carry over unchanged."""

from .categorical import gumbel_max, inverse_cdf, proposal_log_probs, sample_categorical
from .remasking import ReMDM, transition_log_prob
from .schedules import (
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    MaskGITCosineSchedule,
    Schedule,
    get_schedule,
)
from .unmasking import (
    UNMASKING_POLICIES,
    Ancestral,
    LowConfidence,
    MaskGIT,
    RandomUnmasking,
    StepPlan,
    Threshold,
    UnmaskingPolicy,
    get_unmasking,
    plan_steps,
)

__all__ = [
    "UNMASKING_POLICIES",
    "Ancestral",
    "CosineSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "LowConfidence",
    "MaskGIT",
    "MaskGITCosineSchedule",
    "RandomUnmasking",
    "ReMDM",
    "Schedule",
    "StepPlan",
    "Threshold",
    "UnmaskingPolicy",
    "get_schedule",
    "get_unmasking",
    "gumbel_max",
    "inverse_cdf",
    "plan_steps",
    "proposal_log_probs",
    "sample_categorical",
    "transition_log_prob",
]
