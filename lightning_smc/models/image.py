"""``ImageModel``: a class-conditional image-token denoiser with its VQ tokenizer, as one folder.

The embedded image model is a ``MeissonicClassTransformer`` over VQ token grids plus the
``VQTokenizer`` that maps grids to pixels. ``ImagePretraining`` writes it at the end of ``fit``
and ``sample`` / ``ImageEvaluation`` read it::

    <folder>/transformer/       MeissonicClassTransformer.save_pretrained (diffusers format)
    <folder>/vq/                VQTokenizer.save_pretrained (absent: no decoder; tokens only)
    <folder>/lsmc_image.json    {"grid_shape": [h, w], "num_classes": C, "class_names": [...]}

``load_image_model(name_or_path)`` accepts such a folder, ``"embedded_image"`` (the packaged
``assets/meissonic_fmnist_tiny``; while that asset is not trained yet, a seeded random tiny
model with a warning, so that configs smoke-run) or ``"random_tiny_image"`` (that random model,
explicitly). ``is_image_model(name)`` tells ``sample`` which kind of model a config names.
Example::

    model = load_image_model("embedded_image")
    model.denoiser          # MeissonicDenoiser over [B, h * w] grids, mask id = vocab_size - 1
    model.decode(tokens)    # [B, 1, 28, 28] in [0, 1]
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .loading import ASSETS
from .meissonic import MeissonicClassTransformer, MeissonicDenoiser
from .vq import TINY_FMNIST_CONFIG, VQTokenizer

__all__ = [
    "EMBEDDED_IMAGE",
    "IMAGE_NAMES",
    "ImageModel",
    "is_image_model",
    "load_image_model",
    "resolve_image_adapter",
    "tiny_random_image_model",
]

#: the packaged embedded image model (configs/pretrain/meissonic_fmnist_tiny.yaml)
EMBEDDED_IMAGE = ASSETS / "meissonic_fmnist_tiny"
#: the packaged SMCamot adapter of the embedded image model (configs/amortized/fmnist_class_tiny.yaml)
EMBEDDED_IMAGE_ADAPTER = ASSETS / "fmnist_class_adapter_tiny"
#: model names that resolve to an image model without a folder
IMAGE_NAMES = ("embedded_image", "random_tiny_image")
META_FILE = "lsmc_image.json"


@dataclass
class ImageModel:
    """A class-conditional grid denoiser, its tokenizer (``None``: tokens only) and labels."""

    denoiser: MeissonicDenoiser
    vq: VQTokenizer | None
    class_names: tuple[str, ...] | None = None

    @property
    def transformer(self) -> MeissonicClassTransformer:
        return self.denoiser.transformer

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_classes)

    @property
    def null_class(self) -> int:
        """The label of CFG's unconditional branch (``num_classes``)."""
        return self.num_classes

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.denoiser.grid_shape

    @property
    def seq_len(self) -> int:
        h, w = self.grid_shape
        return h * w

    def to(self, device) -> ImageModel:
        self.denoiser.to(device)
        if self.vq is not None:
            self.vq.to(device)
        return self

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Token grids ``[B, h * w]`` -> images ``[B, C, H, W]`` in ``[0, 1]``."""
        if self.vq is None:
            raise ValueError("this image model has no VQ tokenizer: tokens cannot be decoded")
        return self.vq.decode(tokens.to(self.vq.codebook.device))

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        if self.vq is not None:
            self.vq.save_pretrained(folder / "vq")
        meta = {"grid_shape": list(self.grid_shape), "num_classes": self.num_classes}
        if self.class_names is not None:
            meta["class_names"] = list(self.class_names)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageModel:
        folder = Path(folder)
        if not (folder / META_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} is not an image model folder (no {META_FILE}); ImagePretraining "
                "writes one at <default_root_dir>/image_model after fit"
            )
        meta = json.loads((folder / META_FILE).read_text())
        transformer = MeissonicClassTransformer.from_pretrained(folder / "transformer")
        vq = VQTokenizer.from_pretrained(folder / "vq") if (folder / "vq").is_dir() else None
        denoiser = MeissonicDenoiser(transformer.eval(), tuple(meta["grid_shape"]))
        names = meta.get("class_names")
        return cls(denoiser.eval(), vq.eval() if vq else None, tuple(names) if names else None)


def tiny_random_image_model(seed: int = 0, num_classes: int = 10) -> ImageModel:
    """A seeded, untrained tiny model: ``MeissonicClassTransformer`` defaults (256 codes) and the
    Fashion-MNIST VQ configuration (28 x 28 -> 7 x 7). For smoke runs and tests only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = MeissonicClassTransformer(num_classes=num_classes)
        vq = VQTokenizer(TINY_FMNIST_CONFIG, image_size=28)
    return ImageModel(MeissonicDenoiser(transformer, vq.grid_shape).eval(), vq.eval())


def is_image_model(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names an image model (a name above or a folder with its json)."""
    return str(name_or_path) in IMAGE_NAMES or (Path(name_or_path) / META_FILE).is_file()


def load_image_model(name_or_path: str | Path) -> ImageModel:
    """The image model of ``name_or_path`` (module docstring), in eval mode."""
    name = str(name_or_path)
    if name == "random_tiny_image":
        return tiny_random_image_model()
    if name == "embedded_image":
        if (EMBEDDED_IMAGE / META_FILE).is_file():
            return ImageModel.from_pretrained(EMBEDDED_IMAGE)
        warnings.warn(
            f"embedded_image: no trained model at {EMBEDDED_IMAGE} yet (train it with "
            "python -m lightning_smc.fit --config configs/pretrain/meissonic_fmnist_tiny.yaml "
            "and copy <default_root_dir>/image_model there); sampling a RANDOM untrained tiny "
            "model instead (smoke run)",
            stacklevel=2,
        )
        return tiny_random_image_model()
    return ImageModel.from_pretrained(name_or_path)


def resolve_image_adapter(name_or_path: str | Path) -> Path:
    """``"embedded_image"`` -> the packaged LoRA adapter of the embedded image model (an error
    naming the training command while it is absent); anything else: that folder."""
    if str(name_or_path) != "embedded_image":
        return Path(name_or_path)
    if not (EMBEDDED_IMAGE_ADAPTER / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter: embedded_image: no trained adapter at {EMBEDDED_IMAGE_ADAPTER} yet; train "
            "it with python -m lightning_smc.fit --config configs/amortized/fmnist_class_tiny.yaml "
            "and copy <default_root_dir>/adapter there (or give adapter: <that folder>)"
        )
    return EMBEDDED_IMAGE_ADAPTER
