"""Lightning orchestration: training modules (``MDLMPretraining``, ``ImagePretraining``,
``RewardModelModule``, ``AmortizedProposalModule``)."""

from .amortized import AmortizedProposalModule, LogNormalizer
from .image_pretrain import ImagePretraining
from .pretrain import MDLMPretraining, masked_diffusion_loss
from .reward_model import RewardModelModule

__all__ = [
    "AmortizedProposalModule",
    "ImagePretraining",
    "LogNormalizer",
    "MDLMPretraining",
    "RewardModelModule",
    "masked_diffusion_loss",
]
