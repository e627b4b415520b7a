"""Building blocks of Meissonic's transformer, with the parameter names of its Hub checkpoints.

``JointAttention`` is this project's own (plain SDPA): the reference drives diffusers'
``Attention`` through ``FluxAttnProcessor2_0``, which breaks under diffusers 0.42. diffusers
supplies the rest: ``RMSNorm``, AdaLN-Zero, ``FeedForward``, the 2x2 down / up convolutions and
the rotary helpers. The blocks are ``JointBlock`` (MMDiT), ``SingleBlock``, ``TokenEmbed``,
``MlmHead``, ``Resample`` and the Flux RoPE table ``rope_table``. Shapes: ``B`` batch, ``N``
image tokens, ``S`` text tokens, ``D`` width.
Assembled by ``meissonic.MeissonicTransformer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle, RMSNorm
from diffusers.models.resnet import Downsample2D, Upsample2D
from torch import Tensor, nn

__all__ = [
    "JointAttention",
    "JointBlock",
    "MlmHead",
    "Resample",
    "SingleBlock",
    "TokenEmbed",
    "rope_table",
]

EPS = 1e-6  # every RMSNorm / LayerNorm of the reference


class JointAttention(nn.Module):
    """Bidirectional attention with QK RMSNorm and RoPE, Hub names (``to_q``, ``add_q_proj``, ...).

    ``joint=True`` (MMDiT): ``forward(h [B, N, D], rope, context [B, S, D])`` attends over
    ``[context; h]`` with separate projections per stream and returns ``(h', context')`` after
    ``to_out.0`` / ``to_add_out``. ``joint=False`` (single stream): ``forward(h, rope)`` returns
    the attention output without an output projection (the block's ``proj_out`` follows).
    ``rope = (cos, sin)``, each ``[S + N, head_dim]`` (single stream: ``h`` is ``[B, S + N, D]``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool):
        super().__init__()
        self.heads, self.head_dim, self.joint = heads, head_dim, joint
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, EPS), RMSNorm(head_dim, EPS)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, inner) for _ in range(3)
            )
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, EPS), RMSNorm(head_dim, EPS)
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, u: Tensor) -> Tensor:  # [B, N, H * d] -> [B, H, N, d]
        return u.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _qkv(self, u: Tensor, q, k, v, norm_q, norm_k) -> tuple[Tensor, Tensor, Tensor]:
        return norm_q(self._heads(q(u))), norm_k(self._heads(k(u))), self._heads(v(u))

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], context: Tensor | None = None):
        q, k, v = self._qkv(h, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if self.joint:
            cq, ck, cv = self._qkv(
                context,
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.norm_added_q,
                self.norm_added_k,
            )
            q, k, v = (torch.cat(pair, dim=2) for pair in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if not self.joint:
            return out
        S = context.shape[1]
        return self.to_out[1](self.to_out[0](out[:, S:])), self.to_add_out(out[:, :S])


def _clip_half(h: Tensor) -> Tensor:
    """Keep float16 activations finite where the reference does (after each block's residual)."""
    return h.clip(-65504, 65504) if h.dtype == torch.float16 else h


class JointBlock(nn.Module):
    """MMDiT block: AdaLN-Zero attention + gated MLP on the image and on the text stream."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaLayerNormZero(dim), AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, head_dim, joint=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    @staticmethod
    def _mlp(u: Tensor, norm, ff, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        return u + gate[:, None] * ff(norm(u) * (1 + scale[:, None]) + shift[:, None])

    def forward(self, h: Tensor, context: Tensor, temb: Tensor, rope) -> tuple[Tensor, Tensor]:
        """``h [B, N, D]``, ``context [B, S, D]``, ``temb [B, D]`` -> ``(h', context')``."""
        nh, gate, shift_m, scale_m, gate_m = self.norm1(h, emb=temb)
        nc, c_gate, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(context, emb=temb)
        a, ca = self.attn(nh, rope, nc)
        h, context = h + gate[:, None] * a, context + c_gate[:, None] * ca
        h = self._mlp(h, self.norm2, self.ff, shift_m, scale_m, gate_m)
        context = self._mlp(
            context, self.norm2_context, self.ff_context, c_shift_m, c_scale_m, c_gate_m
        )
        return h, _clip_half(context)


class SingleBlock(nn.Module):
    """Single-stream block: attention and a tanh-GELU MLP in parallel, one gated projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp, self.act_mlp = nn.Linear(dim, hidden), nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.attn = JointAttention(dim, heads, head_dim, joint=False)

    def forward(self, h: Tensor, temb: Tensor, rope) -> Tensor:
        """``h [B, S + N, D]``, ``temb [B, D]`` -> ``[B, S + N, D]``."""
        nh, gate = self.norm(h, emb=temb)
        both = torch.cat([self.attn(nh, rope), self.act_mlp(self.proj_mlp(nh))], dim=2)
        return _clip_half(h + gate[:, None] * self.proj_out(both))


class TokenEmbed(nn.Module):
    """``ids [B, H, W]`` -> ``[B, D, H, W]``: embedding, RMSNorm, 1x1 conv (aMUSEd's conv embed)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim, EPS)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.conv(self.layer_norm(self.embeddings(ids)).permute(0, 3, 1, 2))


class MlmHead(nn.Module):
    """``[B, D, H, W]`` -> codebook logits ``[B, K, H, W]``: 1x1 conv, RMSNorm, 1x1 conv."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim, EPS)
        self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer_norm(self.conv1(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(h)


class Resample(nn.Module):
    """The optional 2x2 down / up convolution (with RMSNorm) around the transformer stack."""

    def __init__(self, dim: int, down: bool = False, up: bool = False):
        super().__init__()
        # RMSNorm on the channels first; the convolutions have no bias
        common = {"norm_type": "rms_norm", "eps": EPS, "elementwise_affine": True, "bias": False}
        self.downsample = (
            Downsample2D(dim, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2, **common)
            if down
            else None
        )
        self.upsample = (
            Upsample2D(
                dim, use_conv_transpose=True, kernel_size=2, padding=0, interpolate=False, **common
            )
            if up
            else None
        )

    def forward(self, h: Tensor) -> Tensor:
        for layer in (self.downsample, self.upsample):
            h = h if layer is None else layer(h)
        return h


def rope_table(axes_dims: tuple[int, ...], text_len: int, height: int, width: int, device):
    """Flux RoPE ``(cos, sin)``, each ``[text_len + height * width, sum(axes_dims)]``.

    Position ids have three axes: text tokens are ``(0, 0, 0)``; image token ``(r, c)`` of the
    (reduced) grid is ``(0, r, c)``, row-major. Frequencies are computed in float64."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    ids = torch.zeros(text_len + height * width, 3, device=device, dtype=torch.float64)
    ids[text_len:, 1], ids[text_len:, 2] = rows.double(), cols.double()
    tables = [
        get_1d_rotary_pos_embed(d, ids[:, i], use_real=True, freqs_dtype=torch.float64)
        for i, d in enumerate(axes_dims)
    ]
    return torch.cat([c for c, _ in tables], -1), torch.cat([s for _, s in tables], -1)
