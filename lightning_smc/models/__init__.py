"""Denoisers: networks mapping ``(x_t [B, L], t [B], cond) -> logits [B, L, vocab_size]``.

- ``Denoiser`` (the protocol) and ``ExactDenoiser`` (exact conditionals of a small joint): ``base``;
- ``TinyTransformerDenoiser``: a small bidirectional transformer for demos and tests: ``tiny``;
- ``MDLMDenoiser`` / ``MDLMConfig``: MDLM's DiT with SUBS output, loading and saving checkpoints
  in the ``kuleshov-group/mdlm-owt`` format: ``mdlm``;
- ``LoRADenoiser``: a base denoiser with a peft LoRA adapter (the amortized proposal): ``lora``;
- images (imported on first use: they pull in diffusers): ``MeissonicTransformer`` (the Hub
  checkpoints' parameter names), ``MeissonicClassTransformer`` and the grid denoiser
  ``MeissonicDenoiser``: ``meissonic``; ``VQTokenizer`` (diffusers ``VQModel``): ``vq``;
  ``ImageModel`` / ``load_image_model`` (transformer + VQ + labels): ``image``.

A denoiser never samples (DESIGN.md §2).
"""

from .base import Denoiser, ExactDenoiser
from .lora import LoRADenoiser
from .mdlm import MDLMConfig, MDLMDenoiser
from .tiny import TinyTransformerDenoiser

_LAZY = {
    "MeissonicTransformer": "meissonic",
    "MeissonicClassTransformer": "meissonic",
    "MeissonicDenoiser": "meissonic",
    "VQTokenizer": "vq",
    "ImageModel": "image",
    "load_image_model": "image",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "Denoiser",
    "ExactDenoiser",
    "LoRADenoiser",
    "MDLMConfig",
    "MDLMDenoiser",
    "TinyTransformerDenoiser",
]
