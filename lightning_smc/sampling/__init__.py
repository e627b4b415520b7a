"""The sampler's internals (``SMCSampler`` in ``lightning_smc.sampler`` is the public face).

==============  ===============================================================================
``context``     ``StepContext`` (what potentials and proposals see at a step), ``Scratch``
                buffers, per-row expansion / indexing of ``cond`` (``map_tensors``),
                denoiser log-probs
``cache``       ``CachedDenoiser``: the network of a run, its logit cache, NFE count and the
                announcements of row movements to stateful networks (``reorder_state``)
``propose``     ``Kernel``: one move (positions, tokens, remasking) and its weight increment
``draws``       token draws at chosen positions by one-uniform inverse CDF
``layouts``     where the particles live: ``LocalParticles`` / ``ParticleShards`` (ranks)
``checks``      what the sampler is given (arguments, the first output, ``cond``) and
                ``WeightGuard`` / ``WeightError`` on the log-weights after every increment
``start``       the run's setup: batch and device, per-prompt generators, initial rows, the
                stateful networks, ``RunState``
``trace``       diagnostics and recorded paths being filled in during a run
``output``      ``SMCOutput`` / ``SMCPath``: what a run returns
==============  ===============================================================================
"""

from .cache import CachedDenoiser
from .context import StepContext, denoiser_log_probs, expand_rows, index_rows, output_log_probs
from .layouts import LocalParticles, ParticleShards, get_layout
from .output import SMCOutput, SMCPath
from .propose import Kernel

__all__ = [
    "CachedDenoiser",
    "Kernel",
    "LocalParticles",
    "ParticleShards",
    "SMCOutput",
    "SMCPath",
    "StepContext",
    "denoiser_log_probs",
    "expand_rows",
    "get_layout",
    "index_rows",
    "output_log_probs",
]
