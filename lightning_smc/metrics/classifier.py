"""A small Fashion-MNIST CNN: class accuracy, reward / holdout scorer, and feature extractor.

``FashionMNISTClassifier`` maps images ``x [B, 1, 28, 28]`` in ``[0, 1]`` to logits ``[B, 10]``
through a stack of ``3×3`` conv + BatchNorm + ReLU stages (a 2×2 max-pool between stages),
global average pooling, an optional hidden layer, and a linear head. ``features(x)`` is the
penultimate vector ``[B, feature_dim]`` (what FID / KID / precision-recall compare) and
``logits(x)`` what IS and class accuracy use. Two are committed: ``fmnist_classifier_tiny``
(the domain extractor, channels 32-64-128, ~94k parameters) and ``fmnist_classifier_holdout_tiny``
(channels 24-48-64-96 with a hidden layer, another seed): a reward trained or guided with one is
evaluated with the other.

``train_classifier`` trains one (AdamW, one seeded pass over the training split by default) and
``evaluate_accuracy`` scores it; reproduce an asset with::

    python experiments/train_fmnist_classifier.py --preset tiny --out lightning_smc/assets/fmnist_classifier_tiny
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ASSETS",
    "PRESETS",
    "ClassifierConfig",
    "FashionMNISTClassifier",
    "evaluate_accuracy",
    "load_classifier",
    "train_classifier",
]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: per-pixel mean / std of the Fashion-MNIST training images (in [0, 1])
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


@dataclass
class ClassifierConfig:
    """Architecture of a ``FashionMNISTClassifier``.

    Attributes:
        channels: output channels of each conv stage (a max-pool follows every stage but the last).
        hidden_dim: width of a hidden layer after pooling (``0``: none); the penultimate features
            are this layer's output, else the pooled conv features.
        num_classes: number of classes (10 for Fashion-MNIST).
        image_size: side of the square input images.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    hidden_dim: int = 0
    num_classes: int = 10
    image_size: int = 28

    def __post_init__(self) -> None:
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels={self.channels} must be a non-empty list of sizes >= 1")
        if self.hidden_dim < 0 or self.num_classes < 2:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be >= 0 and num_classes={self.num_classes} >= 2"
            )

    @property
    def feature_dim(self) -> int:
        return self.hidden_dim or self.channels[-1]


PRESETS = {
    "tiny": (ClassifierConfig(channels=[32, 64, 128]), 0),
    "holdout": (ClassifierConfig(channels=[24, 48, 64, 96], hidden_dim=64), 1),
}


class FashionMNISTClassifier(nn.Module):
    """The CNN of the module docstring; ``forward(x [B, 1, H, W] in [0, 1]) -> logits [B, K]``."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(self.config.channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(self.config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        hidden = self.config.hidden_dim
        self.hidden = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def _check(self, x: Tensor) -> Tensor:
        side = self.config.image_size
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (side, side):
            raise ValueError(f"images have shape {tuple(x.shape)}; expected [B, 1, {side}, {side}]")
        return (x.float() - PIXEL_MEAN) / PIXEL_STD

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, feature_dim]`` of images ``[B, 1, H, W]`` in ``[0, 1]``."""
        return self.hidden(self.body(self._check(x)))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return h, self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]

    def save_pretrained(self, folder: str | Path, card: dict | None = None) -> Path:
        """``config.json`` (with ``card`` under ``"training"``) + ``model.safetensors``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"architecture": "FashionMNISTClassifier", **asdict(self.config)}
        if card:
            config["training"] = card
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(state, str(folder / "model.safetensors"))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FashionMNISTClassifier:
        folder = Path(folder)
        files = [folder / "config.json", folder / "model.safetensors"]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: missing {', '.join(missing)}; a classifier folder is written by "
                "FashionMNISTClassifier.save_pretrained (train one with `python "
                "experiments/train_fmnist_classifier.py --preset tiny --out DIR`)"
            )
        raw = json.loads(files[0].read_text())
        fields = {k: raw[k] for k in ("channels", "hidden_dim", "num_classes", "image_size")}
        model = cls(ClassifierConfig(**fields))
        model.load_state_dict(safetensors.torch.load_file(str(files[1])), strict=True)
        return model.eval()


def load_classifier(name_or_path: str | Path = "fmnist_classifier_tiny") -> FashionMNISTClassifier:
    """A committed classifier by asset name (``fmnist_classifier_tiny``,
    ``fmnist_classifier_holdout_tiny``) or a folder path, in eval mode."""
    path = Path(name_or_path)
    if not path.exists() and (ASSETS / str(name_or_path)).exists():
        path = ASSETS / str(name_or_path)
    return FashionMNISTClassifier.from_pretrained(path)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size=500) -> float:
    """Top-1 accuracy of ``model`` on ``images [N, 1, H, W]`` in ``[0, 1]`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(images[i : i + batch_size])
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def train_classifier(
    config: ClassifierConfig,
    images: Tensor,
    labels: Tensor,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> FashionMNISTClassifier:
    """Train on ``images [N, 1, H, W]`` in ``[0, 1]`` / ``labels [N]``: AdamW, linear warm-up
    over 5% of the steps then cosine decay; ``steps=None`` is one pass (``N // batch_size``).
    Initialization and batch order come from ``seed``; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = FashionMNISTClassifier(config)
    steps = len(labels) // batch_size if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [
            torch.randperm(len(labels), generator=g)
            for _ in range(1 + steps * batch_size // len(labels))
        ]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (
            1 + torch.cos(torch.tensor(torch.pi * (step - warmup) / max(1, steps - warmup))).item()
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
