"""LLaDA (Nie et al. 2025; ``GSAI-ML/LLaDA-8B-Instruct``, ``GSAI-ML/LLaDA-1.5``), natively.

A LLaMA-style transformer with **bidirectional** attention (no causal mask), read from the Hub
folder's ``config.json`` (``LLaDAConfig``: the Hub's field names) and safetensors shards
without its remote code. Notation: ``h [B, L, d_model]``, ``hd = d_model / n_heads``.

- ``h = wte[x]``; each of ``n_layers`` blocks:
  ``h += attn_out(attention(rope(q_proj(u)), rope(k_proj(u)), v_proj(u)))`` with
  ``u = attn_norm(h)``, then ``h += ff_out(silu(ff_proj(w)) * up_proj(w))`` with ``w = ff_norm(h)``;
- ``logits = ff_out(ln_f(h))`` (``wte`` when ``weight_tying``), ``[B, L, embedding_size]``.

RMSNorm normalizes in float32; RoPE is ``rotate_half`` (the two halves of a head are the pairs)
with ``rope_theta`` from the config (500,000 for LLaDA-8B) at absolute positions ``0 .. L-1``,
applied in float32 (``rope_full_precision``); the reference's KV cache stores keys before RoPE.
No biases (``include_bias`` / ``include_qkv_bias`` are honoured). Grouped-query attention when
``n_kv_heads < n_heads``. A left-padding ``attention_mask [B, L]`` hides padded keys (positions
stay absolute, as LLaDA's own ``generate``). Parameter names equal the Hub's:
``model.transformer.{wte,ln_f,ff_out}.weight`` and
``model.transformer.blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}.weight``.

``LLaDADenoiser`` is the ``ls.Denoiser`` (mask id 126,336 from ``mask_token_id``; end tokens
``eos_id = (126081, 126348)``: ``<|endoftext|>`` and ``<|eot_id|>``)::

    denoiser = LLaDADenoiser.from_pretrained("checkpoints/LLaDA-8B-Instruct", dtype=torch.bfloat16)
    logits = denoiser(x_t, t)  # [B, L, 126464], float32, mask logit -inf
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

from .dllm import DiffusionLMDenoiser, StrictLoading, rotary_cos_sin

__all__ = ["LLaDAConfig", "LLaDADenoiser", "LLaDAModelLM"]

#: config values this implementation supports (other values of these fields are refused)
_SUPPORTED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "alibi": False,
    "rope": True,
    "attention_layer_norm": False,
    "block_group_size": 1,
}


@strict
class LLaDAConfig(PreTrainedConfig):
    """The Hub's LLaDA ``config.json`` fields (defaults: LLaDA-8B-Instruct). Fields of the
    reference that do not change the function (``init_fn``, ``precision``, dropouts, ...) are
    kept as they are; architecture options this module does not implement are refused."""

    model_type = "llada"

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    layer_norm_type: str = "rms"
    rms_norm_eps: float = 1e-5
    rope: bool = True
    rope_theta: float = 500000.0
    rope_full_precision: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    max_sequence_length: int = 4096
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    init_std: float = 0.02
    mask_token_id: int = 126336
    bos_token_id: int | None = 126080
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    use_cache: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("auto_map", None)  # the Hub's remote-code pointers: never used here
        for name, value in _SUPPORTED.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"LLaDAConfig: {name}={getattr(self, name)!r} is not supported (LLaDA-8B and "
                    f"LLaDA-1.5 use {value!r})"
                )
        if self.d_model % self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(
                f"LLaDAConfig: d_model={self.d_model}, n_heads={self.n_heads} and "
                f"n_kv_heads={self.n_kv_heads} do not split into whole (grouped) heads"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary")
        super().__post_init__(**kwargs)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_hidden(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model


class LLaDABlock(nn.Module):
    """Pre-norm attention + SwiGLU block with LLaDA's parameter names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd, bias = config.d_model, config.d_model // config.n_heads, config.include_bias
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, hd
        self.attn_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.ff_hidden, bias=bias)
        self.up_proj = nn.Linear(d, config.ff_hidden, bias=bias)
        self.ff_out = nn.Linear(config.ff_hidden, d, bias=bias)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(h, (cos, sin))
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.n_heads
        )
        return self.mix(h, a)

    def qkv(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (both after RoPE) and values ``[B, heads, L, hd]`` of ``h [B, L, d]``."""
        B, L, _ = h.shape
        cos, sin = rope
        u = self.attn_norm(h)
        q = self.q_proj(u).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(u).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(u).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = (((w.float() * cos) + rotate_half(w.float()) * sin).to(w.dtype) for w in (q, k))
        return q, k, v

    def mix(self, h: Tensor, a: Tensor) -> Tensor:
        """The rest of the block after attention ``a [B, heads, L, hd]``: output projection,
        residual, SwiGLU."""
        B, L, D = h.shape
        h = h + self.attn_out(a.transpose(1, 2).reshape(B, L, D))
        w = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(w)) * self.up_proj(w))


class LLaDABackbone(nn.Module):
    """``transformer.{wte, blocks, ln_f, ff_out}`` as in the Hub checkpoints."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        width = config.embedding_size or config.vocab_size
        parts = {
            "wte": nn.Embedding(width, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps),
        }
        if not config.weight_tying:
            parts["ff_out"] = nn.Linear(config.d_model, width, bias=config.include_bias)
        self.transformer = nn.ModuleDict(parts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids)
        cos, sin = self.rotary(h, self.positions(input_ids, attention_mask))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.transformer.blocks:
            h = block(h, cos, sin, mask)
        return self.head(h)

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.transformer.wte(input_ids)
        return h * self.config.d_model**0.5 if self.config.input_emb_norm else h

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Absolute positions ``[L]`` (also under left padding, as LLaDA's own ``generate``)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)

    def rotary(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        config = self.config
        return rotary_cos_sin(positions, config.d_model // config.n_heads, config.rope_theta)

    def head(self, h: Tensor) -> Tensor:
        config, h = self.config, self.transformer.ln_f(h)
        head = self.transformer.wte if config.weight_tying else self.transformer.ff_out
        logits = F.linear(h, head.weight, getattr(head, "bias", None))
        return logits / config.d_model**0.5 if config.scale_logits else logits


class LLaDAModelLM(StrictLoading, PreTrainedModel):
    """LLaDA's masked-diffusion transformer (the Hub's ``LLaDAModelLM``), natively."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDABackbone(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any
    ) -> MaskedLMOutput:
        """``logits [B, L, embedding_size]``; ``attention_mask [B, L]``: 0 hides padded keys."""
        return MaskedLMOutput(logits=self.model(input_ids, attention_mask))

    # The pieces of ``forward`` that ``dllm_cache.CachedDiffusionLM`` drives (KV caches).
    def layers(self) -> nn.ModuleList:
        """The blocks, each with ``qkv(h, rope)`` and ``mix(h, attention)``."""
        return self.model.transformer.blocks

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed(input_ids)

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.positions(input_ids, attention_mask)

    def rotary(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.rotary(h, positions)

    def head(self, h: Tensor) -> Tensor:
        return self.model.head(h)


class LLaDADenoiser(DiffusionLMDenoiser):
    """``ls.Denoiser`` over ``LLaDAModelLM``: logits of the ``vocab_size`` ids, mask ``-inf``;
    ``eos_id``: the config's ``eos_token_id`` (``<|endoftext|>`` 126081) and, at the Hub's
    vocabulary, LLaDA-Instruct's ``<|eot_id|>`` 126348 (``dllm``'s "End tokens")."""

    hub_end_of_turn = (126348,)
    hub_vocab_size = 126464

    def __init__(self, model: LLaDAModelLM):
        config = model.config
        super().__init__(model, config.mask_token_id, config.vocab_size, config.eos_token_id)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> LLaDADenoiser:
        """Load a Hub LLaDA folder strictly (``kwargs`` go to ``from_pretrained``: ``dtype``,
        ``device_map``, ...)."""
        return cls(LLaDAModelLM.from_pretrained(path, **kwargs)).eval()
