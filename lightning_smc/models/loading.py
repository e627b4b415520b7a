"""Checkpoint directories: the embedded base model and ``save_pretrained`` folders with a tokenizer.

``resolve_checkpoint("embedded")`` is the model that ships with the package
(``lightning_smc/assets/mdlm_tiny``); any other value is a folder path.
``resolve_adapter("embedded")`` is the amortized sentiment proposal trained for it.
``load_checkpoint(path)`` returns ``(denoiser, tokenizer spec)`` and checks that they agree.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "EMBEDDED",
    "EMBEDDED_ADAPTER",
    "load_checkpoint",
    "resolve_adapter",
    "resolve_checkpoint",
]

EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "mdlm_tiny"
#: the amortized sentiment proposal (LoRA) of the embedded model, trained by configs/quickstart.yaml
EMBEDDED_ADAPTER = Path(__file__).resolve().parent.parent / "assets" / "sentiment_adapter_tiny"


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """``"embedded"`` -> the packaged model folder; anything else -> ``Path(name_or_path)``."""
    return EMBEDDED if str(name_or_path) == "embedded" else Path(name_or_path)


def resolve_adapter(name_or_path: str | Path) -> Path:
    """``"embedded"`` -> the packaged LoRA adapter of the embedded model; else the folder."""
    return EMBEDDED_ADAPTER if str(name_or_path) == "embedded" else Path(name_or_path)


def load_checkpoint(path: str | Path):
    """``(denoiser, tokenizer spec)`` from a ``save_pretrained`` directory with its tokenizer."""
    from .mdlm import MDLMDenoiser
    from .tokenizer import load_tokenizer

    path = resolve_checkpoint(path)
    if not (path / "config.json").is_file():
        hint = (
            " (the embedded model ships with the package; reinstall it)" if path == EMBEDDED else ""
        )
        raise FileNotFoundError(f"checkpoint {path}: no config.json there{hint}")
    denoiser = MDLMDenoiser.from_pretrained(path).eval()
    spec = load_tokenizer(path)
    if spec.vocab_size != denoiser.vocab_size or spec.mask_id != denoiser.mask_id:
        raise ValueError(
            f"checkpoint {path}: tokenizer vocabulary ({spec.vocab_size}, mask {spec.mask_id}) "
            f"does not match the model ({denoiser.vocab_size}, mask {denoiser.mask_id})"
        )
    return denoiser, spec
