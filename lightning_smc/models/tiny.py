"""``TinyTransformerDenoiser``: a small bidirectional transformer implementing ``ls.Denoiser``.

Used by the demo, the sampler-overhead benchmark and tests that need a real network; the MDLM
DiT backbone lives in its own module. ``x_t [B, L] -> logits [B, L, vocab_size]`` with a
sinusoidal embedding of ``t`` added to every position and the mask logit set to ``-inf``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TinyTransformerDenoiser"]


class TinyTransformerDenoiser(nn.Module):
    #: default LoRA targets (``LoRADenoiser``): the feed-forward layers and the output head
    lora_target_modules = ("linear1", "linear2", "head")

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 128,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
    ):
        super().__init__()
        self.vocab_size, self.mask_id, self.max_len = vocab_size, vocab_size - 1, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.time = nn.Sequential(
            nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def _time_features(self, t: Tensor, dim: int) -> Tensor:
        freqs = torch.exp(
            -math.log(10_000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2)
        )
        angles = t.float().unsqueeze(-1) * 1000.0 * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        L = x_t.shape[1]
        if self.max_len < L:
            raise ValueError(f"sequence length {L} exceeds the model's max_len={self.max_len}")
        h = (
            self.embed(x_t)
            + self.pos[:L]
            + self.time(self._time_features(t, self.pos.shape[1])).unsqueeze(1)
        )
        logits = self.head(self.norm(self.blocks(h)))
        logits[..., self.mask_id] = -torch.inf
        return logits
