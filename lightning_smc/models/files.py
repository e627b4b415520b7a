"""Safe, named file readers: every model, adapter, reward and checkpoint file is read here.

``read_json(path, what)``, ``read_safetensors(path)`` and ``read_checkpoint(path)`` (always
``torch.load(weights_only=True)``: tensors and plain containers only, so a checkpoint whose
pickle would run code is refused, never retried unsafely). Every failure names the file and
what is wrong with it, and none suggests ``weights_only=False``.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

__all__ = ["read_checkpoint", "read_json", "read_safetensors"]

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
