"""Fashion-MNIST from its idx files, and ``FashionMNISTDataModule`` (train / val / test splits).

The files are the four gzipped idx files of Zalando's release (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``:
60,000 + 10,000 grey 28×28 images, 10 classes, MIT licence), read from ``root``, by default
``/usr/share/datasets/fashion-mnist`` where Debian's ``dataset-fashion-mnist`` installs them
(``apt-get install dataset-fashion-mnist``; ``scripts/setup.sh`` does it where it can).

Splits: ``test`` is the official 10,000-image test set; ``val`` is ``val_size`` images of the
official training set drawn by a seeded permutation (``seed``), ``train`` the rest. Items are
``(image, label)``: ``image`` float32 ``[1, 28, 28]`` in ``[0, 1]`` (``value_range="unit"``, the
VQ tokenizer's and torch-fidelity's convention after ``x * 255``) or ``[-1, 1]``
(``value_range="symmetric"``), ``label`` an int64 scalar in ``0..9`` (``CLASS_NAMES``).

The train loader is resumable mid-epoch (``ResumableDataLoader`` over a per-epoch seeded
permutation), so a run resumed from a checkpoint sees the very batches the uninterrupted run saw.

Example::

    dm = FashionMNISTDataModule(batch_size=128)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))   # [128, 1, 28, 28] in [0, 1], [128]
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .packing import EpochShuffleSampler, ResumableDataLoader

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_PACKAGE",
    "DEFAULT_ROOT",
    "FashionMNISTDataModule",
    "ImageDataset",
    "load_fashion_mnist",
    "read_idx",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
VALUE_RANGES = ("unit", "symmetric")
#: idx type codes -> numpy dtypes (big-endian)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an idx file (gzipped or not): ``[N]`` labels or ``[N, H, W]`` images."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[type_code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, file holds {array.size} values")
    return array.reshape(shape).astype(np.dtype(_IDX_DTYPES[type_code]).newbyteorder("="))


def missing_data_message(root: str | Path, missing: list[str]) -> str:
    return (
        f"Fashion-MNIST not found: {', '.join(missing)} missing in root={str(root)!r}. Install "
        f"Debian's {DEBIAN_PACKAGE} (`apt-get install -y {DEBIAN_PACKAGE}`, which writes "
        f"{DEFAULT_ROOT}; scripts/setup.sh does it when run as root), or pass root= a folder "
        "holding the four *-ubyte.gz files"
    )


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT, split: str = "train"):
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the official ``"train"`` or ``"test"``
    split (``FileNotFoundError`` naming the Debian package and ``root=`` when files are absent).

    Arrays are read once per process and shared (read-only; copy before writing)."""
    return _load(str(Path(root).resolve()), split)


@functools.lru_cache(maxsize=4)
def _load(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in FILES:
        raise ValueError(f"split={split!r}: the idx files hold 'train' and 'test'")
    paths = [Path(root) / name for name in FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(missing_data_message(root, missing))
    images, labels = (read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    labels = labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


class ImageDataset(Dataset):
    """``(image float32 [1, H, W], label int64)`` items from uint8 images ``[N, H, W]``.

    ``value_range``: ``"unit"`` maps 0..255 to ``[0, 1]``, ``"symmetric"`` to ``[-1, 1]``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, value_range: str = "unit") -> None:
        if value_range not in VALUE_RANGES:
            raise ValueError(f"value_range={value_range!r}: choose one of {VALUE_RANGES}")
        self.images, self.labels, self.value_range = images, labels, value_range

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(self.images[index].astype(np.float32)).div_(255.0)
        if self.value_range == "symmetric":
            x = x.mul_(2.0).sub_(1.0)
        return x.unsqueeze(0), torch.tensor(int(self.labels[index]))

    def uint8_images(self) -> Tensor:
        """All images as uint8 ``[N, 1, H, W]`` (what torch-fidelity takes)."""
        return torch.from_numpy(np.array(self.images, dtype=np.uint8)).unsqueeze(1)


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST train / val / test loaders (see the module docstring).

    Args:
        root: folder with the four idx ``*-ubyte.gz`` files.
        batch_size: images per batch (every split).
        val_size: training images held out for validation (seeded draw).
        seed: seeds the val draw and the per-epoch train order.
        value_range: ``"unit"`` (``[0, 1]``) or ``"symmetric"`` (``[-1, 1]``).
        max_train: keep only the first ``max_train`` training images (after the split; ``None``:
            all), e.g. for smoke runs.
        num_workers: loader worker processes.
    """

    image_shape = (1, 28, 28)
    num_classes = len(CLASS_NAMES)

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        value_range: str = "unit",
        max_train: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        checks = [
            (batch_size >= 1, f"batch_size={batch_size} must be >= 1"),
            (0 < val_size < 60000, f"val_size={val_size} must lie in [1, 59999]"),
            (value_range in VALUE_RANGES, f"value_range={value_range!r}: one of {VALUE_RANGES}"),
            (max_train is None or max_train >= 1, f"max_train={max_train} must be None or >= 1"),
            (num_workers >= 0, f"num_workers={num_workers} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.root, self.batch_size, self.val_size, self.seed = root, batch_size, val_size, seed
        self.value_range, self.max_train, self.num_workers = value_range, max_train, num_workers
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_fashion_mnist(self.root, "train")
        order = np.random.default_rng(self.seed).permutation(len(labels))
        val_idx = np.sort(order[: self.val_size])
        train_idx = np.sort(order[self.val_size :])[: self.max_train]
        self.train_set = ImageDataset(images[train_idx], labels[train_idx], self.value_range)
        self.val_set = ImageDataset(images[val_idx], labels[val_idx], self.value_range)
        self.test_set = ImageDataset(*load_fashion_mnist(self.root, "test"), self.value_range)

    def split(self, name: str) -> ImageDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` dataset (after ``setup``)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split={name!r}: choose 'train', 'val' or 'test'")
        self.setup()
        return getattr(self, f"{name}_set")

    def train_dataloader(self) -> DataLoader:
        data = self.split("train")
        sampler = EpochShuffleSampler(data, seed=self.seed)
        return ResumableDataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def _in_order(self, name: str) -> DataLoader:
        return DataLoader(
            self.split(name), batch_size=self.batch_size, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._in_order("val")

    def test_dataloader(self) -> DataLoader:
        return self._in_order("test")
