"""Lightning orchestration: training modules (``MDLMPretraining``, ``RewardModelModule``,
``AmortizedProposalModule``)."""

from .amortized import AmortizedProposalModule, LogNormalizer
from .pretrain import MDLMPretraining, masked_diffusion_loss
from .reward_model import RewardModelModule

__all__ = [
    "AmortizedProposalModule",
    "LogNormalizer",
    "MDLMPretraining",
    "RewardModelModule",
    "masked_diffusion_loss",
]
