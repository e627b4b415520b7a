"""Lightning orchestration: training modules (``MDLMPretraining``)."""

from .pretrain import MDLMPretraining, masked_diffusion_loss

__all__ = ["MDLMPretraining", "masked_diffusion_loss"]
