"""``LearnedReward``: a small differentiable reward on the diffusion model's vocabulary.

For SMCgrad the reward must be differentiable w.r.t. a *soft* sequence: ``x0`` may be token
ids ``[B, L]`` (long) or a relaxed one-hot ``[B, L, V]`` (float, e.g. Gumbel-softmax; ``V`` =
the denoiser's ``vocab_size``, mask column included — the sampler may leave it at zero). Both
go through the same embedding matrix ``E [V, D]``: ids by lookup ``E[x0]``, soft inputs as
``x0 @ E``, which gives identical values for an exact one-hot. Then

    h = W_in e                                        [B, L, H]
    h = h + Dropout(GELU(Conv1d_k(LayerNorm(h))))      (n_layers residual conv blocks)
    s_i = w . LayerNorm(h_i)                           per-position contribution
    z = a * pool_i(m_i s_i) + b                        pool = "sum" (default) or "mean"
    r = activation(z)                                  "tanh" | "linear" | "log_sigmoid"

where ``m_i`` = 1 minus the position's mass on ``ignored_ids`` (pad, mask: not text), whose
embedding rows are also zeroed, so padding adds nothing to the sum.

The additive head mirrors lexicon scorers such as VADER (a normalized sum of word valences,
modified by local context that the convolutions see), and ``tanh`` bounds the output like
VADER's compound score. ``"log_sigmoid"`` (trained with BCE) gives ``log p(success | x)``.

Checkpoints use the Hugging Face layout: ``config.json`` (``LearnedRewardConfig`` fields plus
``model_type``) and ``model.safetensors``; ``save_pretrained(dir, tokenizer=...)`` also writes
the diffusion model's tokenizer there, so the directory is self-contained::

    reward = LearnedReward.from_pretrained("embedded")    # lightning_smc/assets/sentiment_reward_tiny
    reward(x0_ids)              # float64 [B]
    reward(soft_onehot)         # float64 [B], differentiable w.r.t. soft_onehot [B, L, V]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.loading import EMBEDDED_REWARD, EMBEDDED_TOXICITY_REWARD, read_json, read_safetensors
from .base import BaseReward, check_reward_output

__all__ = [
    "EMBEDDED_SENTIMENT_REWARD",
    "LearnedReward",
    "LearnedRewardConfig",
    "PretrainedLearnedReward",
]

EMBEDDED_SENTIMENT_REWARD = EMBEDDED_REWARD
"""The embedded learned sentiment reward (imitates VADER on the embedded MDLM's vocabulary)."""
#: ``config.json`` fields that fix the shapes of the weights and the meaning of the output
REQUIRED_CONFIG_FIELDS = (
    "vocab_size", "embed_dim", "hidden_dim", "n_layers", "kernel_size", "pooling", "activation"
)  # fmt: skip

MODEL_TYPE = "lightning_smc_learned_reward"
ACTIVATIONS = ("tanh", "linear", "log_sigmoid")
POOLINGS = ("sum", "mean")


@dataclass
class LearnedRewardConfig:
    """Hyperparameters of ``LearnedReward`` (the ``config.json`` fields).

    Args:
        vocab_size: ids of the diffusion model's vocabulary, mask included (the ``V`` of soft
            inputs).
        mask_id: the mask token (``None``: ``vocab_size - 1``).
        embed_dim, hidden_dim: widths of the embedding and of the convolutional stream.
        n_layers, kernel_size: residual conv blocks and their (odd) kernel size.
        dropout: dropout inside the conv blocks while training.
        pooling: ``"sum"`` or ``"mean"`` of the per-position contributions.
        activation: ``"tanh"``, ``"linear"`` or ``"log_sigmoid"`` output.
        ignored_ids: ids that are not text (pad, mask: what ``TextReward`` drops when
            decoding); their positions have a zero embedding and add nothing to the pooled
            score. ``None``: ``[mask_id]``.
        success_threshold: a sequence succeeds when its reward is above this.
        name: a short name (logs, tables).
        target: what the reward imitates (documentation, e.g. ``"vader"``).
    """

    vocab_size: int = 4096
    mask_id: int | None = None
    embed_dim: int = 64
    hidden_dim: int = 64
    n_layers: int = 2
    kernel_size: int = 5
    dropout: float = 0.1
    pooling: str = "sum"
    activation: str = "tanh"
    ignored_ids: list[int] | None = None
    success_threshold: float = 0.05
    name: str = "learned"
    target: str = ""

    def __post_init__(self) -> None:
        if self.mask_id is None:
            self.mask_id = self.vocab_size - 1
        if self.ignored_ids is None:
            self.ignored_ids = [self.mask_id]
        self.ignored_ids = sorted({int(i) for i in self.ignored_ids})
        checks = [
            (self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2"),
            (
                0 <= self.mask_id < self.vocab_size,
                f"mask_id={self.mask_id} is not in [0, {self.vocab_size})",
            ),
            (self.embed_dim >= 1 and self.hidden_dim >= 1, "embed_dim and hidden_dim must be >= 1"),
            (self.n_layers >= 0, f"n_layers={self.n_layers} must be >= 0"),
            (
                all(0 <= i < self.vocab_size for i in self.ignored_ids),
                f"ignored_ids={self.ignored_ids} must lie in [0, {self.vocab_size})",
            ),
            (
                self.kernel_size >= 1 and self.kernel_size % 2 == 1,
                f"kernel_size={self.kernel_size} must be odd and >= 1",
            ),
            (0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must lie in [0, 1)"),
            (self.pooling in POOLINGS, f"pooling={self.pooling!r}: choose one of {POOLINGS}"),
            (
                self.activation in ACTIVATIONS,
                f"activation={self.activation!r}: choose one of {ACTIVATIONS}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> LearnedRewardConfig:
        """Read a ``config.json`` dict (HF bookkeeping keys ignored)."""
        if fields.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(
                f"config.json has model_type={fields['model_type']!r}, not {MODEL_TYPE!r}: "
                "not a LearnedReward checkpoint"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["LearnedReward"],
            "model_type": MODEL_TYPE,
            **dataclasses.asdict(self),
        }


class _ConvBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:  # [B, L, H]
        u = self.conv(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return h + self.dropout(F.gelu(u))


class LearnedReward(nn.Module, BaseReward):
    """Differentiable reward ``x0 -> [B]`` for ids ``[B, L]`` or soft one-hots ``[B, L, V]``.

    Build it from a ``LearnedRewardConfig`` or from its fields
    (``LearnedReward(vocab_size=4096, hidden_dim=128)``); load one with ``from_pretrained``.
    """

    differentiable = True

    def __init__(self, config: LearnedRewardConfig | None = None, **fields: Any):
        super().__init__()
        if config is not None and fields:
            raise TypeError("pass either a LearnedRewardConfig or config fields, not both")
        self.config = config if config is not None else LearnedRewardConfig(**fields)
        c = self.config
        self.vocab_size, self.mask_id = c.vocab_size, c.mask_id
        self.embedding = nn.Parameter(torch.randn(c.vocab_size, c.embed_dim) * c.embed_dim**-0.5)
        self.proj_in = nn.Linear(c.embed_dim, c.hidden_dim)
        self.blocks = nn.ModuleList(
            _ConvBlock(c.hidden_dim, c.kernel_size, c.dropout) for _ in range(c.n_layers)
        )
        self.norm_out = nn.LayerNorm(c.hidden_dim)
        self.head = nn.Linear(c.hidden_dim, 1)
        # Zero-initialized head: the reward starts at activation(0), away from tanh saturation.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.out_scale = nn.Parameter(torch.ones(()))
        self.out_bias = nn.Parameter(torch.zeros(()))
        keep = torch.ones(c.vocab_size)
        keep[c.ignored_ids] = 0.0
        self.register_buffer("keep", keep, persistent=False)  # 0 at ignored ids

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def success_threshold(self) -> float:
        return self.config.success_threshold

    # ---- forward ----------------------------------------------------------------------------
    def embed(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``([B, L, D], [B, L])``: embeddings of ids (lookup) or soft one-hots (``x0 @ E``),
        and each position's weight in the pooling (``1 - `` its mass on ``ignored_ids``)."""
        if not isinstance(x0, Tensor):
            raise TypeError(f"LearnedReward expects a torch.Tensor, got {type(x0).__name__}")
        if x0.is_floating_point():
            if x0.dim() != 3:
                raise ValueError(
                    f"a soft input must be a one-hot-like float tensor [B, L, V], got shape "
                    f"{tuple(x0.shape)}"
                )
            if x0.shape[-1] != self.vocab_size:
                raise ValueError(
                    f"soft input has V={x0.shape[-1]} columns but this reward's vocabulary has "
                    f"vocab_size={self.vocab_size} ids (mask_id={self.mask_id} included): "
                    "use the reward trained on the denoiser's tokenizer"
                )
            x0 = x0.to(self.embedding.dtype)
            return x0 @ (self.embedding * self.keep[:, None]), x0 @ self.keep
        if x0.dtype == torch.bool or x0.dim() != 2:
            raise ValueError(
                f"LearnedReward expects token ids LongTensor [B, L] or soft one-hots [B, L, V]; "
                f"got {x0.dtype} of shape {tuple(x0.shape)}"
            )
        if x0.numel():
            lo, hi = (int(v) for v in torch.aminmax(x0))
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}) (this reward's vocabulary), "
                    f"got [{lo}, {hi}]"
                )
        x0 = x0.long()
        return F.embedding(x0, self.embedding * self.keep[:, None]), self.keep[x0]

    def logits(self, x0: Tensor) -> Tensor:
        """The pre-activation score ``z`` ``[B]`` (float32; what BCE training uses)."""
        e, weight = self.embed(x0)
        h = self.proj_in(e)
        for block in self.blocks:
            h = block(h)
        s = self.head(self.norm_out(h)).squeeze(-1)  # [B, L]
        pooled = (s * weight).sum(-1)
        if self.config.pooling == "mean":
            pooled = pooled / weight.sum(-1).clamp_min(1.0)
        return self.out_scale * pooled + self.out_bias

    def activate(self, z: Tensor) -> Tensor:
        """The configured output activation applied to ``logits``."""
        if self.config.activation == "tanh":
            return torch.tanh(z)
        if self.config.activation == "log_sigmoid":
            return F.logsigmoid(z)
        return z

    def predict(self, x0: Tensor) -> Tensor:
        """The reward in the model's dtype (float32), unchecked: for training."""
        return self.activate(self.logits(x0))

    def forward(self, x0: Tensor) -> Tensor:
        """The reward ``[B]`` as float64 (differentiable), validated by ``check_reward_output``."""
        return check_reward_output(self, self.predict(x0), x0.shape[0])

    def success(self, x0: Tensor) -> Tensor:
        """Bool ``[B]``: reward above ``success_threshold``."""
        with torch.no_grad():
            return self(x0) > self.success_threshold

    # ---- Hugging Face layout ---------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer when given)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config = {**self.config.to_dict(), "torch_dtype": str(self.embedding.dtype).split(".")[-1]}
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            from ..models.tokenizer import save_tokenizer

            save_tokenizer(getattr(tokenizer, "tokenizer", tokenizer), directory)  # spec or object
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded") -> LearnedReward:
        """Load a ``save_pretrained`` directory (``"embedded"``: the shipped sentiment reward;
        ``"embedded_toxicity"``: the shipped toxicity surrogate)."""
        packaged = {"embedded": EMBEDDED_REWARD, "embedded_toxicity": EMBEDDED_TOXICITY_REWARD}
        directory = packaged.get(str(path), Path(path))
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"LearnedReward.from_pretrained({str(path)!r}): {directory} must hold "
                "config.json and model.safetensors (written by LearnedReward.save_pretrained)"
            )
        fields = read_json(config_path, "the LearnedReward config")
        lacking = [f for f in REQUIRED_CONFIG_FIELDS if f not in fields]
        if lacking:
            raise ValueError(f"{config_path} lacks the LearnedReward config field(s) {lacking}")
        try:
            model = cls(LearnedRewardConfig.from_dict(fields))
        except (TypeError, ValueError) as err:  # a field of the wrong type or value
            raise ValueError(f"{config_path} is not a valid LearnedReward config: {err}") from None
        state = read_safetensors(weights_path)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # size mismatches
            raise ValueError(f"{weights_path} does not fit its config.json: {err}") from None
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} does not match its config.json: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return model.eval()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"vocab_size={c.vocab_size}, embed_dim={c.embed_dim}, hidden_dim={c.hidden_dim}, "
            f"n_layers={c.n_layers}, pooling={c.pooling!r}, activation={c.activation!r}"
        )


class PretrainedLearnedReward(LearnedReward):
    """A ``LearnedReward`` loaded from a ``save_pretrained`` folder, for YAML configs::

    reward:
      class_path: lightning_smc.rewards.PretrainedLearnedReward
      init_args: {path: embedded}   # or a folder written by RewardModelModule
    """

    def __init__(self, path: str | Path = "embedded"):
        loaded = LearnedReward.from_pretrained(path)
        super().__init__(loaded.config)
        self.load_state_dict(loaded.state_dict())
        self.eval()
