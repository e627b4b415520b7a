"""Checkpoint directories: the embedded base model and ``save_pretrained`` folders with a tokenizer.

``resolve_checkpoint("embedded")`` is the model that ships with the package
(``lightning_smc/assets/mdlm_tiny``); any other value is a folder path.
``resolve_adapter("embedded")`` is the amortized sentiment proposal trained for it.
``load_model(name_or_path, tokenizer=None)`` returns ``(denoiser, tokenizer spec)`` and checks
that they agree; ``load_denoiser(name_or_path)`` the denoiser alone. Every entry point (``sample``,
the method builder, ``AmortizedProposalModule``, the benchmarks) loads models through these.

Every file is read through ``read_json``, ``read_safetensors`` or ``read_checkpoint``: pickles are
only ever unpickled with ``torch.load(weights_only=True)`` (tensors and plain containers; a
checkpoint that would run code is refused), and every failure names the file and what is wrong
with it. ``ASSETS`` and the ``EMBEDDED*`` folders are the one definition of the packaged models.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS",
    "EMBEDDED",
    "EMBEDDED_ADAPTER",
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
#: the amortized sentiment proposal (LoRA) of the embedded model, trained by configs/quickstart.yaml
EMBEDDED_ADAPTER = ASSETS / "sentiment_adapter_tiny"
#: the learned sentiment reward (imitates VADER) on the embedded model's vocabulary
EMBEDDED_REWARD = ASSETS / "sentiment_reward_tiny"

_REEXPORT = "re-export or re-download it"


def read_json(path: str | Path, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``; a missing, unreadable or non-object file is an error naming
    ``path`` and ``what`` it should hold (e.g. ``"the model config"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it should hold {what}: {_REEXPORT}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; it should hold {what}"
        )
    return data


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file (CPU); a missing, truncated or corrupted file is an
    error naming ``path``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected safetensors weights)")
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError (bad header, truncated), OSError, ...
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): the file is truncated or "
            f"corrupted; {_REEXPORT}"
        ) from None


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name ``path``.

    Only tensors and plain containers are unpickled: a pickle that would call anything else (code
    execution) is refused, never retried unsafely. A Lightning checkpoint written by ``fit`` (EMA
    state included) and a ``torch.save``d state dict load fine.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise pickle.UnpicklingError(
                f"{path}: refused to load: its pickle calls {found.group(1)}, which is not a "
                "tensor or a plain container. Unpickling anything else can run code from the "
                "file, so only those are read (a checkpoint written by fit and a torch.save'd "
                "state dict hold nothing else): re-save the file's tensors as a state dict"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(err))
        reason = f": {detail.group(1)}" if detail else ""
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (its pickle stream is corrupted or it is not a "
            f"torch.save file{reason}); {_REEXPORT}"
        ) from None
    except Exception as err:  # truncated zip archive, bad magic number, EOF, ...
        first = str(err).split(". ")[0].replace("weights_only=False", "").strip()
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({first}): the file is truncated or "
            f"corrupted; {_REEXPORT}"
        ) from None


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
