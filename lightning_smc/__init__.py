"""lightning_smc: Sequential Monte Carlo for masked discrete diffusion models, on Lightning.

Public surface (DESIGN.md §4)::

    import lightning_smc as ls
    sampler = ls.SMCSampler(denoiser, num_particles=N, num_steps=T, potential=ls.SelfReward())
    out = sampler.sample(seq_len=L, batch_size=B, generator=torch.Generator().manual_seed(0))
    out.tokens, out.log_weights, out.log_normalizer, out.ess, out.best()

With ``torch.distributed`` initialized, ``SMCSampler(..., layout=ls.ParticleShards())`` splits
each prompt's ``N`` particles over the ranks with global resampling (``lightning_smc.sampling.layouts``).
"""

from .models.base import CodebookDenoiser, Denoiser, ExactDenoiser
from .models.loading import load_model
from .models.lora import LoRADenoiser
from .models.tiny import TinyTransformerDenoiser
from .potentials import Potential, ProductTarget, RewardTilt, SelfReward
from .proposals import DenoiserProposal, GradientProposal, Proposal
from .rewards import (
    AfinnSentiment,
    BaseReward,
    HFClassifierReward,
    LearnedReward,
    ProfanityToxicity,
    Reward,
    TextReward,
    VaderSentiment,
    WordListToxicity,
)
from .sampler import SMCSampler
from .sampling.checks import WeightError
from .sampling.layouts import LocalParticles, ParticleShards
from .sampling.output import SMCOutput
from .smc import derive_seed

__all__ = [
    "AfinnSentiment",
    "BaseReward",
    "HFClassifierReward",
    "LearnedReward",
    "LoRADenoiser",
    "LocalParticles",
    "ParticleShards",
    "ProfanityToxicity",
    "TextReward",
    "VaderSentiment",
    "WordListToxicity",
    "CodebookDenoiser",
    "Denoiser",
    "DenoiserProposal",
    "ExactDenoiser",
    "GradientProposal",
    "Potential",
    "ProductTarget",
    "Proposal",
    "Reward",
    "RewardTilt",
    "SMCOutput",
    "SMCSampler",
    "SelfReward",
    "TinyTransformerDenoiser",
    "WeightError",
    "derive_seed",
    "load_model",
]

__version__ = "0.1.0"
