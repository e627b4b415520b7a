"""``LoRADenoiser``: the amortized proposal ``q_phi`` — a base denoiser with a peft LoRA adapter.

The base network's weights are frozen and *shared*: peft injects the adapter into the base
module in place, so after wrapping, the base module itself computes ``q_phi``. Evaluate
``p_theta`` through ``lora.base_denoiser``, a view that runs the same module with the adapter
disabled (peft's ``disable_adapter``). A freshly initialised adapter (``lora_B = 0``) gives
exactly the base logits.

Adapters are saved in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``)
plus ``lsmc_adapter.json``, which records the base model's vocabulary, mask id and a fingerprint
of its weights; ``LoRADenoiser.from_adapter`` refuses an adapter trained for another base::

    q = LoRADenoiser(MDLMDenoiser.from_pretrained(path), rank=8)
    sampler = SMCSampler(q.base_denoiser, proposal=DenoiserProposal(q), potential=...)
    q.save_adapter("adapter/")
    q2 = LoRADenoiser.from_adapter(MDLMDenoiser.from_pretrained(path), "adapter/")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import read_checkpoint, read_json, read_safetensors

__all__ = ["GuidedDenoiser", "LoRADenoiser", "weights_fingerprint"]

ADAPTER_META = "lsmc_adapter.json"


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``module``'s state dict (hex, 16 chars)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def default_target_modules(base: nn.Module) -> list[str]:
    targets = getattr(base, "lora_target_modules", None)
    if targets is None:
        raise ValueError(
            f"{type(base).__name__} declares no default LoRA target modules; pass "
            "target_modules=[...] (names of its nn.Linear submodules, e.g. 'attn_qkv')"
        )
    return list(targets)


class _AdapterDisabled:
    """``p_theta``: the shared base module evaluated with the adapter switched off."""

    def __init__(self, lora: LoRADenoiser):
        self._lora = lora
        self.vocab_size, self.mask_id = lora.vocab_size, lora.mask_id
        self.time_conditioning = lora.time_conditioning
        self.outputs_log_probs = lora.outputs_log_probs

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        with self._lora.peft.disable_adapter():
            return self._lora.peft(x_t, t, cond)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._lora.parameters()


class LoRADenoiser(nn.Module):
    """``q_phi``: ``base`` with a LoRA adapter of ``rank`` / ``alpha`` on ``target_modules``.

    Args:
        base: an ``nn.Module`` denoiser (modified in place by peft; see the module docstring).
        rank, alpha, dropout: LoRA hyper-parameters (``alpha / rank`` scales the update).
        init: peft's ``init_lora_weights``: ``True`` (``lora_A`` Kaiming-uniform) or
            ``"gaussian"`` (``lora_A ~ N(0, 1 / rank)``); ``lora_B = 0`` either way, so a new
            adapter computes exactly the base.
        target_modules: names (suffixes) of ``nn.Linear`` submodules to adapt; default: the
            model's ``lora_target_modules`` (MDLM: attention ``attn_qkv``, ``attn_out`` and
            the MLP ``mlp.0``, ``mlp.2``).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        init: bool | str = True,
        _peft_model: Any = None,
        _fingerprint: str | None = None,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        if init not in (True, "gaussian"):
            raise ValueError(f"LoRA init must be true (Kaiming A) or 'gaussian', got {init!r}")
        self.vocab_size, self.mask_id = base.vocab_size, base.mask_id
        self.outputs_log_probs = bool(getattr(base, "outputs_log_probs", False))
        self.time_conditioning = bool(getattr(base, "time_conditioning", False)) or bool(
            getattr(getattr(base, "config", None), "time_conditioning", False)
        )
        self.base_fingerprint = _fingerprint or weights_fingerprint(base)
        self.base_class = type(base).__name__
        if _peft_model is None:
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                init_lora_weights=init,
                target_modules=list(target_modules or default_target_modules(base)),
                bias="none",
            )
            try:
                _peft_model = get_peft_model(base, config)
            except ValueError as err:
                raise ValueError(
                    f"LoRA target_modules={config.target_modules} do not fit {self.base_class}: {err}"
                ) from err
        self.peft = _peft_model
        self.base_denoiser = _AdapterDisabled(self)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.peft(x_t, t, cond)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if "lora_" in n]

    # ------------------------------------------------------------------ persistence
    def save_adapter(self, directory: str | Path) -> Path:
        """peft's ``save_pretrained`` plus ``lsmc_adapter.json`` (vocabulary and base fingerprint)."""
        directory = Path(directory)
        self.peft.save_pretrained(str(directory))
        meta = {
            "base_class": self.base_class,
            "base_fingerprint": self.base_fingerprint,
            "vocab_size": self.vocab_size,
            "mask_id": self.mask_id,
        }
        (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_adapter(
        cls, base: nn.Module, directory: str | Path, trainable: bool = False
    ) -> LoRADenoiser:
        """Load an adapter saved by ``save_adapter`` onto ``base``; a different base is an error."""
        from peft import PeftModel

        directory = Path(directory)
        meta_path = directory / ADAPTER_META
        if not (directory / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{directory} is not a peft adapter folder (no adapter_config.json)"
            )
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory} has no {ADAPTER_META}; it was not saved by LoRADenoiser.save_adapter, "
                "so its base model cannot be checked"
            )
        # Read (and check) every file here, so that a damaged one is named, not reported by peft.
        read_json(directory / "adapter_config.json", "the peft LoRA config")
        meta = read_json(meta_path, "the adapter's base model record (LoRADenoiser.save_adapter)")
        lacking = [f for f in ("vocab_size", "mask_id", "base_fingerprint") if f not in meta]
        if lacking:
            raise ValueError(f"{meta_path} lacks the field(s) {lacking}")
        if (directory / "adapter_model.safetensors").is_file():
            read_safetensors(directory / "adapter_model.safetensors")
        elif (directory / "adapter_model.bin").is_file():
            read_checkpoint(directory / "adapter_model.bin")
        else:
            raise FileNotFoundError(
                f"{directory} has no adapter weights (adapter_model.safetensors or .bin)"
            )
        for field, value in (("vocab_size", base.vocab_size), ("mask_id", base.mask_id)):
            if meta[field] != value:
                raise ValueError(
                    f"adapter {directory} was trained for a base with {field}={meta[field]}, but "
                    f"this base has {field}={value}; load it onto the model it was trained for"
                )
        fingerprint = weights_fingerprint(base)
        if meta["base_fingerprint"] != fingerprint:
            raise ValueError(
                f"adapter {directory} was trained on a different base model (weights fingerprint "
                f"{meta['base_fingerprint']}, this base {fingerprint}, class {type(base).__name__}); "
                "load it onto the checkpoint it was trained on"
            )
        try:
            model = PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
        except (TypeError, ValueError, KeyError, RuntimeError) as err:  # fields peft cannot use
            raise ValueError(
                f"adapter {directory}: peft cannot load it onto {type(base).__name__} "
                f"(adapter_config.json or the weights do not fit the base): {err}"
            ) from None
        return cls(base, _peft_model=model, _fingerprint=fingerprint)


class GuidedDenoiser:
    """Classifier-free guidance as a denoiser: the normalized CFG kernel of ``denoiser``.

    ``log p_w(v | x_t, c) = log_softmax_v(w log p(v | x_t, c) + (1 - w) log p(v | x_t, null))``
    at every position (``w`` = Meissonic's guidance scale: logits ``u + w (c - u)``; ``w = 1`` is
    the conditional model), with ``null`` = ``null_cond`` (a class label for every row) or, when
    ``None``, the denoiser called with ``cond=None`` (a ``MeissonicDenoiser``'s null class).
    Tokens outside the conditional support (the mask) stay at ``-inf``. It returns normalized
    log-probabilities (``outputs_log_probs``), so a sampler driving it draws exactly from the
    standard CFG sampler's kernel, and a LoRA proposal and its reference are guided alike:
    ``GuidedDenoiser(lora)`` / ``GuidedDenoiser(lora.base_denoiser)`` (two network calls each).
    """

    outputs_log_probs = True

    def __init__(self, denoiser: Any, weight: float, null_cond: int | None = None):
        weight = float(weight)
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise ValueError(f"guidance weight must be a finite number > 0, got {weight!r}")
        self.denoiser, self.weight, self.null_cond = denoiser, weight, null_cond
        self.vocab_size, self.mask_id = denoiser.vocab_size, denoiser.mask_id
        self.time_conditioning = bool(getattr(denoiser, "time_conditioning", False))

    def _log_probs(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        out = self.denoiser(x_t, t, cond).float()
        if getattr(self.denoiser, "outputs_log_probs", False):
            return out
        out = out.clone()
        out[..., self.mask_id] = -torch.inf
        return torch.log_softmax(out, dim=-1)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        lp_c = self._log_probs(x_t, t, cond)
        if self.weight == 1.0:
            return lp_c
        null = None
        if self.null_cond is not None:
            null = torch.full((x_t.shape[0],), self.null_cond, dtype=torch.long, device=x_t.device)
        lp_u = self._log_probs(x_t, t, null)
        mixed = self.weight * lp_c + (1.0 - self.weight) * lp_u
        mixed = torch.where(torch.isfinite(lp_c) & torch.isfinite(lp_u), mixed, -torch.inf)
        return torch.log_softmax(mixed, dim=-1)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.denoiser.parameters()
