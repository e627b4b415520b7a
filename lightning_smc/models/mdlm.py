"""``MDLMDenoiser``: MDLM's DiT (Sahoo et al. 2024) with SUBS output, in the mdlm-owt format.

Notation (DESIGN.md §3): ``x_t [B, L]`` token ids (``mask_id`` where masked), ``t [B]`` in
``[0, 1]``, ``sigma = -log alpha(t)`` the total noise of ``LogLinearSchedule`` (MDLM's
log-linear noise, ``eps = 1e-3``); ``sigma = 0`` when ``time_conditioning`` is off, as in MDLM
and mdlm-owt. The backbone is MDLM's DiT:

- ``h = E[x_t]`` (``vocab_embed``); ``c = silu(sigma_map(sinusoid_256(sigma)))``;
- each block: ``(shift, scale, gate) x 2 = adaLN_modulation(c)``, then
  ``h += gate_a * W_o attn(rope(W_qkv mod(norm1(h))))`` and ``h += gate_m * mlp(mod(norm2(h)))``
  with ``mod(u) = u (1 + scale) + shift``, weight-only LayerNorm, bidirectional attention with
  rotary embeddings on ``q, k`` (SDPA);
- ``logits = output_layer(h, c)`` (adaLN-modulated norm + linear, zero-initialised).

SUBS parameterization turns logits into ``log p_theta(x0 | x_t) [B, L, vocab_size]``: the mask
logit is ``-inf`` and masked rows are ``log_softmax``-normalized; at clean positions
(``x_t != mask_id``) the row is the carry-over one-hot: ``0`` at ``x_t``, ``-inf`` elsewhere.

Checkpoints are ``kuleshov-group/mdlm-owt``'s: ``config.json`` with its fields (``MDLMConfig``)
and ``model.safetensors`` with its keys (``backbone.vocab_embed.embedding``,
``backbone.blocks.{i}.attn_qkv.weight``, ``backbone.rotary_emb.inv_freq``, ...).
``MDLMDenoiser.from_pretrained(dir)`` loads one strictly, never running remote code; bf16 is the
caller's ``torch.autocast`` (norms, rotary and the SUBS softmax stay float32)::

    model = MDLMDenoiser.from_pretrained("checkpoints/mdlm-small")
    log_p = model(x_t, t)  # [B, L, vocab_size]
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.schedules import LogLinearSchedule
from .files import read_checkpoint, read_json, read_safetensors

__all__ = ["MDLMConfig", "MDLMDenoiser"]

#: ``config.json`` fields that fix the shapes of the weights (the rest have mdlm-owt defaults)
REQUIRED_CONFIG_FIELDS = (
    "vocab_size",
    "model_length",
    "hidden_dim",
    "cond_dim",
    "n_blocks",
    "n_heads",
)


@dataclass
class MDLMConfig:
    """mdlm-owt's ``config.json`` fields (defaults = mdlm-owt) plus ``mask_id``.

    Args:
        vocab_size: token space including the mask token (50258 = GPT-2 + mask).
        model_length: the longest ``L`` the model accepts.
        hidden_dim, cond_dim: widths of the residual stream and of ``c``.
        n_blocks, n_heads: DiT depth and attention heads (``hidden_dim / n_heads`` even).
        dropout: residual dropout while training.
        time_conditioning: feed ``sigma(t)`` to ``sigma_map`` (``False``: ``sigma = 0``).
        mask_id: the mask token (``None``: ``vocab_size - 1``, MDLM's convention).
    """

    vocab_size: int = 50258
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    mask_id: int | None = None

    def __post_init__(self) -> None:
        if self.mask_id is None:
            self.mask_id = self.vocab_size - 1
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} is not in [0, {self.vocab_size})")
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must split into n_heads={self.n_heads} heads "
                "of even size (rotary embeddings rotate pairs)"
            )

    @classmethod
    def from_dict(cls, fields: dict[str, Any], **overrides: Any) -> MDLMConfig:
        """Read a ``config.json`` dict; HF bookkeeping keys are ignored, ``overrides`` win."""
        if fields.get("model_type", "mdlm") != "mdlm":
            raise ValueError(f"config.json has model_type={fields['model_type']!r}, not 'mdlm'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown MDLMConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**{**{k: v for k, v in fields.items() if k in names}, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The mdlm-owt ``config.json`` layout (``mask_id`` only when non-default)."""
        fields = dataclasses.asdict(self)
        if fields["mask_id"] == self.vocab_size - 1:
            del fields["mask_id"]
        # HF bookkeeping as in mdlm-owt (no auto_map: we ship no remote code).
        return {"architectures": ["MDLM"], "model_type": "mdlm", "return_dict": False, **fields}


class _LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in float32 even under autocast (as MDLM)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: Tensor) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return F.layer_norm(h.float(), h.shape[-1:]) * self.weight.float()


class _Embedding(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding[x]


class _SigmaEmbedder(nn.Module):
    """``sigma [B] -> [B, cond_dim]``: a 256-wide cos/sin embedding followed by an MLP."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device) / half)
        angles = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class _Rotary(nn.Module):
    """Rotary tables; ``inv_freq`` is a persistent buffer because mdlm-owt's checkpoint stores it."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )

    def forward(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(length, device=device).float(), self.inv_freq.float())
        angles = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, L, 1, head_dim]
        return angles.cos(), angles.sin()


def _rotate(u: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Non-interleaved (GPT-NeoX) rotation, the convention of flash-attn's rotary kernel."""
    u1, u2 = u.float().chunk(2, dim=-1)
    return (u.float() * cos + torch.cat([-u2, u1], dim=-1) * sin).to(u.dtype)


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return h * (1 + scale[:, None]) + shift[:, None]


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = _LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = _LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], c: Tensor) -> Tensor:
        B, L, D = h.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, -1)
        qkv = self.attn_qkv(_modulate(self.norm1(h), shift_a, scale_a))
        q, k, v = qkv.view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)  # [B, L, heads, d]
        q, k, v = (u.transpose(1, 2) for u in (_rotate(q, *rope), _rotate(k, *rope), v))
        a = self.attn_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        h = h + gate_a[:, None] * F.dropout(a, self.dropout, self.training)
        m = self.mlp(_modulate(self.norm2(h), shift_m, scale_m))
        return h + gate_m[:, None] * F.dropout(m, self.dropout, self.training)


class _FinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = _LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(h), shift, scale))


class _Backbone(nn.Module):
    """MDLM's DiT; attribute names match mdlm-owt's ``DITBackbone`` so state-dict keys agree."""

    def __init__(self, config: MDLMConfig):
        super().__init__()
        dim, cond_dim = config.hidden_dim, config.cond_dim
        self.vocab_embed = _Embedding(dim, config.vocab_size)
        self.sigma_map = _SigmaEmbedder(cond_dim)
        self.rotary_emb = _Rotary(dim // config.n_heads)
        self.blocks = nn.ModuleList(
            _Block(dim, config.n_heads, cond_dim, config.dropout) for _ in range(config.n_blocks)
        )
        self.output_layer = _FinalLayer(dim, config.vocab_size, cond_dim)

    def forward(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        h = self.vocab_embed(x_t)
        c = F.silu(self.sigma_map(sigma))
        rope = self.rotary_emb(x_t.shape[1], x_t.device)
        for block in self.blocks:
            h = block(h, rope, c)
        return self.output_layer(h, c)


class MDLMDenoiser(nn.Module):
    """``ls.Denoiser``: ``(x_t [B, L], t [B]) -> log p_theta(x0 | x_t) [B, L, vocab_size]`` (SUBS)."""

    #: the outputs are normalized log-probabilities (SUBS): the sampler does not renormalize them
    outputs_log_probs = True
    #: default LoRA targets (``LoRADenoiser``): attention and MLP of every DiT block
    lora_target_modules = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")

    def __init__(self, config: MDLMConfig | None = None, **fields: Any):
        super().__init__()
        if config is not None and fields:
            raise TypeError("pass either an MDLMConfig or config fields, not both")
        self.config = config if config is not None else MDLMConfig(**fields)
        self.vocab_size, self.mask_id = self.config.vocab_size, self.config.mask_id
        self.schedule = LogLinearSchedule()
        self.backbone = _Backbone(self.config)

    def _check(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if cond is not None:
            raise ValueError("MDLMDenoiser is unconditional; pass cond=None")
        if x_t.dim() != 2 or x_t.dtype.is_floating_point or x_t.dtype == torch.bool:
            raise ValueError(f"x_t must be integer token ids [B, L], got {x_t.dtype} {x_t.shape}")
        batch, length = x_t.shape
        if length > self.config.model_length:
            raise ValueError(f"length {length} exceeds model_length={self.config.model_length}")
        lo, hi = (int(v) for v in torch.aminmax(x_t)) if x_t.numel() else (0, 0)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{lo}, {hi}]")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.dim() > 1 or t.numel() not in (1, batch):
            raise ValueError(f"t must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
        return t.reshape(-1).expand(batch)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        t = self._check(x_t, t, cond)
        sigma = self.schedule.sigma(t) if self.config.time_conditioning else torch.zeros_like(t)
        logits = self.backbone(x_t.long(), sigma)
        with torch.autocast(x_t.device.type, enabled=False):
            bias = torch.zeros(self.vocab_size, device=x_t.device)
            bias[self.mask_id] = -torch.inf
            log_p = torch.log_softmax(logits.float() + bias, dim=-1)
            # Carry-over without a [B, L, V] one-hot: clear clean rows, then put 0 at x_t. At masked
            # rows the scatter writes -inf at mask_id, which is already -inf.
            clean = (x_t != self.mask_id)[..., None]
            src = torch.zeros_like(log_p[..., :1]).masked_fill(~clean, -torch.inf)
            return log_p.masked_fill(clean, -torch.inf).scatter(-1, x_t.long()[..., None], src)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in the mdlm-owt layout; returns the folder."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        dtype = str(state["backbone.vocab_embed.embedding"].dtype).removeprefix("torch.")
        config = {**self.config.to_dict(), "torch_dtype": dtype}
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> MDLMDenoiser:
        """Load a folder (or, with ``huggingface_hub``, a hub id) written in the mdlm-owt format.

        ``overrides`` replace config fields (e.g. ``dropout=0.0``). Weights come from
        ``model.safetensors`` or else ``pytorch_model.bin``; keys must match exactly.
        """
        directory = _resolve_checkpoint(path)
        config_path = directory / "config.json"
        fields = read_json(config_path, "the MDLM config (mdlm-owt format)")
        missing = [f for f in REQUIRED_CONFIG_FIELDS if f not in fields and f not in overrides]
        if missing:
            raise ValueError(f"{config_path} lacks the MDLM config field(s) {missing}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MDLMConfig)})
        if unknown:  # the caller's mistake, not the file's
            MDLMConfig.from_dict(fields, **overrides)
        try:
            model = cls(MDLMConfig.from_dict(fields, **overrides))
        except (TypeError, ValueError) as err:  # a field of the wrong type or value
            raise ValueError(f"{config_path} is not a valid MDLM config: {err}") from None
        weights, source = _read_weights(directory)
        model.load_checkpoint(weights, source=str(source))
        return model.eval()

    def load_checkpoint(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Strict load whose error names every missing and unexpected key."""
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match MDLMDenoiser(n_blocks={self.config.n_blocks}): "
                f"missing keys {missing}; unexpected keys {unexpected} "
                "(expected mdlm-owt names such as 'backbone.blocks.0.attn_qkv.weight')"
            )
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{source} does not fit config {self.config}: {err}") from err


def _resolve_checkpoint(path: str | Path) -> Path:
    directory = Path(path)
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} has no config.json (expected mdlm-owt format)")
        return directory
    if directory.exists() or str(path).count("/") != 1:
        raise FileNotFoundError(f"{path} is not a folder with config.json + model.safetensors")
    try:  # a hub id: fetch the data files only; repo code is never downloaded, let alone run
        from huggingface_hub import snapshot_download

        files = ["config.json", "model.safetensors", "pytorch_model.bin"]
        return _resolve_checkpoint(snapshot_download(str(path), allow_patterns=files))
    except (ImportError, OSError, ValueError) as err:  # no package, offline, unknown repo, ...
        raise FileNotFoundError(
            f"{path} is neither a local folder nor a reachable hub repo"
        ) from err


def _read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """The state dict of ``directory`` and the file it came from."""
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors"), directory / "model.safetensors"
    if (directory / "pytorch_model.bin").is_file():
        path = directory / "pytorch_model.bin"
        state = read_checkpoint(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
        return state, path
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
