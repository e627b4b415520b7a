"""Denoisers: networks mapping ``(x_t [B, L], t [B], cond) -> logits [B, L, vocab_size]``.

- ``Denoiser`` (the protocol) and ``ExactDenoiser`` (exact conditionals of a small joint): ``base``;
- ``TinyTransformerDenoiser``: a small bidirectional transformer for demos and tests: ``tiny``;
- ``MDLMDenoiser`` / ``MDLMConfig``: MDLM's DiT with SUBS output, loading and saving checkpoints
  in the ``kuleshov-group/mdlm-owt`` format: ``mdlm``;
- ``LoRADenoiser``: a base denoiser with a peft LoRA adapter (the amortized proposal): ``lora``.

A denoiser never samples (DESIGN.md §2).
"""

from .base import Denoiser, ExactDenoiser
from .lora import LoRADenoiser
from .mdlm import MDLMConfig, MDLMDenoiser
from .tiny import TinyTransformerDenoiser

__all__ = [
    "Denoiser",
    "ExactDenoiser",
    "LoRADenoiser",
    "MDLMConfig",
    "MDLMDenoiser",
    "TinyTransformerDenoiser",
]
