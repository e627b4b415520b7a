"""Checkpoint directories: the embedded base model and ``save_pretrained`` folders with a tokenizer.

``resolve_checkpoint("embedded")`` is the model that ships with the package
(``lightning_smc/assets/mdlm_tiny``); any other value is a folder path.
``resolve_adapter("embedded")`` is the amortized sentiment proposal trained for it.
``load_model(name_or_path, tokenizer=None)`` returns ``(denoiser, tokenizer spec)`` and checks
that they agree; ``load_denoiser(name_or_path)`` the denoiser alone. Every entry point (``sample``,
the method builder, ``AmortizedProposalModule``, the benchmarks) loads models through these.

Every file is read through ``models.files`` (``read_json``, ``read_safetensors``,
``read_checkpoint``, re-exported here): pickles are only ever unpickled with
``torch.load(weights_only=True)`` and every failure names the file. ``ASSETS`` and the ``EMBEDDED*`` folders are the one definition of the packaged models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import read_checkpoint, read_json, read_safetensors

__all__ = [
    "ASSETS",
    "EMBEDDED",
    "EMBEDDED_ADAPTER",
    "EMBEDDED_TOXICITY_REWARD",
    "EMBEDDED_REWARD",
    "load_denoiser",
    "load_model",
    "read_checkpoint",
    "read_json",
    "read_safetensors",
    "resolve_adapter",
    "resolve_checkpoint",
]

#: the models packaged with lightning_smc
ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: the embedded base model (MDLM on Shakespeare) and its tokenizer
EMBEDDED = ASSETS / "mdlm_tiny"
#: the amortized sentiment proposal (LoRA) of the embedded model (configs/amortized/sentiment_tiny.yaml)
EMBEDDED_ADAPTER = ASSETS / "sentiment_adapter_tiny"
#: the learned sentiment reward (imitates VADER) on the embedded model's vocabulary
EMBEDDED_REWARD = ASSETS / "sentiment_reward_tiny"
#: the learned toxicity surrogate (imitates ProfanityToxicity), for SMCgrad on toxicity
EMBEDDED_TOXICITY_REWARD = ASSETS / "toxicity_reward_tiny"


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """``"embedded"`` -> the packaged model folder; anything else -> ``Path(name_or_path)``."""
    return EMBEDDED if str(name_or_path) == "embedded" else Path(name_or_path)


def resolve_adapter(name_or_path: str | Path) -> Path:
    """``"embedded"`` -> the packaged LoRA adapter of the embedded model; else the folder."""
    return EMBEDDED_ADAPTER if str(name_or_path) == "embedded" else Path(name_or_path)


def load_denoiser(name_or_path: str | Path) -> Any:
    """The denoiser of ``name_or_path`` (``"embedded"``, a ``save_pretrained`` folder or a hub id
    in the mdlm-owt format), in eval mode."""
    from .mdlm import MDLMDenoiser

    path = resolve_checkpoint(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        hint = (
            " (the embedded model ships with the package; reinstall it)" if path == EMBEDDED else ""
        )
        raise FileNotFoundError(f"checkpoint {path}: no config.json there{hint}")
    return MDLMDenoiser.from_pretrained(path).eval()


def load_model(name_or_path: str | Path, tokenizer: str | Path | None = None):
    """``(denoiser, tokenizer spec)`` of ``name_or_path``: ``"embedded"`` or a ``save_pretrained``
    folder with its tokenizer, or (with ``tokenizer``, e.g. ``"gpt2"``) any checkpoint the
    denoiser loads, such as a hub id in the mdlm-owt format. The vocabularies must agree."""
    from .tokenizer import load_tokenizer

    path = resolve_checkpoint(name_or_path)
    if tokenizer is None and not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local checkpoint folder; a hub id needs its "
            "tokenizer named (tokenizer: gpt2)"
        )
    denoiser = load_denoiser(path)
    spec = load_tokenizer(path if tokenizer is None else tokenizer)
    if spec.vocab_size != denoiser.vocab_size or spec.mask_id != denoiser.mask_id:
        raise ValueError(
            f"checkpoint {path}: tokenizer vocabulary ({spec.vocab_size}, mask {spec.mask_id}) "
            f"does not match the model ({denoiser.vocab_size}, mask {denoiser.mask_id})"
        )
    return denoiser, spec
