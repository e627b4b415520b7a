"""Dream (Ye et al. 2025; ``Dream-org/Dream-v0-Base-7B``, ``-Instruct-7B``), natively.

Dream is Qwen2.5-7B's architecture turned into a masked-diffusion model: the Qwen2 layout and
parameter names with **bidirectional** attention, read from the Hub folder's ``config.json``
(``DreamConfig``: ``Qwen2Config``'s fields plus ``mask_token_id``) and safetensors shards without
its remote code. Built from transformers' Qwen2 pieces (``Qwen2RMSNorm``, ``Qwen2MLP``,
``Qwen2RotaryEmbedding``, ``apply_rotary_pos_emb``); attention is SDPA without a causal mask.

- ``h = embed_tokens[x]``; each layer: ``h += o_proj(attention(rope(q), rope(k), v))`` on
  ``input_layernorm(h)`` with biased ``q_proj, k_proj, v_proj`` (grouped-query:
  ``num_key_value_heads``), then ``h += mlp(post_attention_layernorm(h))`` (SwiGLU:
  ``down_proj(silu(gate_proj(w)) * up_proj(w))``);
- ``logits = lm_head(norm(h))`` (untied ``lm_head``).

Keys: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}``,
``model.layers.{i}.self_attn.o_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
``lm_head.weight``. A left-padding ``attention_mask [B, L]`` hides padded keys and numbers the
positions of the tokens from 0 (Dream's own ``generate``: ``cumsum(mask) - 1``).

**Shifted logits.** Dream keeps its autoregressive parent's output convention: the logits at
position ``i - 1`` score token ``i``. ``DreamModel`` returns them unshifted, as the reference
does; ``DreamDenoiser`` (mask id 151,666) shifts them (``cat([logits[:, :1], logits[:, :-1]])``)
so that the sampler sees row ``i`` scoring token ``i``, like every other denoiser. End tokens
(``eos_id``): the config's ``eos_token_id`` plus, at the Hub's vocabulary, ``<|endoftext|>``
151643 and ``<|im_end|>`` 151645::

    denoiser = DreamDenoiser.from_pretrained("checkpoints/Dream-v0-Instruct-7B", dtype=torch.bfloat16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedModel, Qwen2Config
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from .dllm import DiffusionLMDenoiser, StrictLoading

__all__ = ["DreamConfig", "DreamDenoiser", "DreamModel"]


@strict
class DreamConfig(Qwen2Config):
    """The Hub's Dream ``config.json``: ``Qwen2Config`` plus ``mask_token_id``."""

    model_type = "Dream"

    mask_token_id: int = 151666
    pad_token_id: int | None = 151643
    use_cache: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("auto_map", None)  # the Hub's remote-code pointers: never used here
        super().__post_init__(**kwargs)
        if self.use_sliding_window:
            raise ValueError("DreamConfig: use_sliding_window=True is not supported (Dream: False)")
        if self.hidden_size % self.num_attention_heads or (
            self.num_attention_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"DreamConfig: hidden_size={self.hidden_size}, num_attention_heads="
                f"{self.num_attention_heads} and num_key_value_heads={self.num_key_value_heads} "
                "do not split into whole (grouped) heads"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary")


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.heads, self.kv_heads, self.head_dim = heads, kv, d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, u: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(u, rope)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads
        )
        return self.out(a)

    def qkv(self, u: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (both after RoPE) and values ``[B, heads, L, hd]``."""
        B, L, _ = u.shape
        q = self.q_proj(u).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(u).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(u).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        return q, k, v

    def out(self, a: Tensor) -> Tensor:
        B, _, L, _ = a.shape
        return self.o_proj(a.transpose(1, 2).reshape(B, L, -1))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def qkv(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.self_attn.qkv(self.input_layernorm(h), rope)

    def mix(self, h: Tensor, a: Tensor) -> Tensor:
        """The rest of the layer after attention ``a [B, heads, L, hd]``."""
        h = h + self.self_attn.out(a)
        return h + self.mlp(self.post_attention_layernorm(h))


class DreamBaseModel(nn.Module):
    """``embed_tokens``, ``layers``, ``norm`` as in the Hub checkpoints (``model.*``)."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed_tokens(input_ids)
        rope = self.rotary_emb(h, self.positions(input_ids, attention_mask))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = layer(h, rope, mask)
        return self.norm(h)

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Position ids ``[1, L]``, or ``[B, L]`` under left padding (Dream's generate: tokens
        numbered from 0 after the padding)."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 1)


class DreamModel(StrictLoading, PreTrainedModel):
    """Dream's masked-diffusion transformer (the Hub's ``DreamModel``), natively."""

    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any
    ) -> MaskedLMOutput:
        """Unshifted ``logits [B, L, vocab_size]`` (position ``i`` scores token ``i + 1``)."""
        return MaskedLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask)))

    # The pieces of ``forward`` that ``dllm_cache.CachedDiffusionLM`` drives (KV caches).
    def layers(self) -> nn.ModuleList:
        """The decoder layers, each with ``qkv(h, rope)`` and ``mix(h, attention)``."""
        return self.model.layers

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.positions(input_ids, attention_mask)

    def rotary(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.rotary_emb(h, positions)

    def head(self, h: Tensor) -> Tensor:
        """Unshifted logits of the last hidden states."""
        return self.lm_head(self.model.norm(h))


class DreamDenoiser(DiffusionLMDenoiser):
    """``ls.Denoiser`` over ``DreamModel``: shifted logits, mask ``-inf``; ``eos_id``: the
    config's ``eos_token_id`` and, at the Hub's vocabulary (152,064), Qwen2.5's
    ``<|endoftext|>`` 151643 and ``<|im_end|>`` 151645 (``dllm``'s "End tokens")."""

    shifted = True
    hub_end_of_turn = (151643, 151645)
    hub_vocab_size = 152064

    def __init__(self, model: DreamModel):
        config = model.config
        super().__init__(model, config.mask_token_id, config.vocab_size, config.eos_token_id)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> DreamDenoiser:
        """Load a Hub Dream folder strictly (``kwargs`` go to ``from_pretrained``)."""
        return cls(DreamModel.from_pretrained(path, **kwargs)).eval()
