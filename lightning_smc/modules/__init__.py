"""Lightning orchestration: training modules (``MDLMPretraining``, ``ImagePretraining``,
``RewardModelModule``, ``AmortizedProposalModule``, ``MaskedSFT``: LLaDA's SFT loss)."""

from .amortized import AmortizedProposalModule, LogNormalizer
from .image_pretrain import ImagePretraining
from .pretrain import MDLMPretraining, masked_diffusion_loss
from .reward_model import RewardModelModule
from .sft import MaskedSFT

__all__ = [
    "AmortizedProposalModule",
    "ImagePretraining",
    "LogNormalizer",
    "MDLMPretraining",
    "MaskedSFT",
    "RewardModelModule",
    "masked_diffusion_loss",
]
