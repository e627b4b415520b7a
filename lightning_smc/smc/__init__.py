"""Pure SMC numerics on tensors: log-weights, ESS, resampling schemes and strategies, seeding.

This layer imports nothing from the rest of ``lightning_smc`` and nothing from Lightning or
W&B. Notation (DESIGN.md §3): particles on the last axis ``[..., N]``, log-weights ``log_w`` in
float64, ancestors ``A`` as LongTensors, every stochastic call with an explicit generator.
``plan_exchange`` is the index algebra of a resample whose particles are split over ranks.
"""

from .exchange import Exchange, plan_exchange
from .resampling import RESAMPLING_SCHEMES, get_resampling, register_resampling
from .seeding import RowGenerators, derive_seed, rand_at
from .strategies import (
    Always,
    AtBlockBoundaries,
    ESSBelow,
    EveryK,
    Never,
    ResampleStrategy,
    StepInfo,
    get_strategy,
)
from .weights import ess, log_mean_exp, normalize

__all__ = [
    "RESAMPLING_SCHEMES",
    "AtBlockBoundaries",
    "Always",
    "ESSBelow",
    "Exchange",
    "EveryK",
    "Never",
    "ResampleStrategy",
    "RowGenerators",
    "StepInfo",
    "derive_seed",
    "ess",
    "get_resampling",
    "get_strategy",
    "log_mean_exp",
    "normalize",
    "plan_exchange",
    "rand_at",
    "register_resampling",
]
