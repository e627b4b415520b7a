"""``ImageTextFolderDataModule``: image-caption pairs from a folder, for text-to-image fine-tuning.

The folder follows the Hugging Face ``imagefolder`` convention: image files plus a
``metadata.jsonl`` whose lines are ``{"file_name": "<relative path>", "text": "<caption>"}``
(``caption_key`` renames ``text``). Each image is converted to RGB (or kept grey with
``channels=1``), resized so that its shorter side is ``resolution`` and center-cropped to
``resolution x resolution``, in ``[0, 1]`` (the VQ tokenizer's range). Batches are
``(images [B, C, R, R], captions list[str])``. A seeded ``val_fraction`` of the pairs is held out.
The folder is read in ``setup``, so a config parses (and fails on its model first) without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ImageTextFolder", "ImageTextFolderDataModule"]

METADATA = "metadata.jsonl"


def _load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        scale = resolution / min(img.size)
        w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor.unsqueeze(0)


class ImageTextFolder(Dataset):
    """``(image [C, R, R] in [0, 1], caption)`` pairs of ``records`` under ``root``."""

    def __init__(self, root: Path, records: list[dict], resolution: int, channels: int, key: str):
        self.root, self.records = root, records
        self.resolution, self.channels, self.key = resolution, channels, key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        record = self.records[i]
        image = _load_image(self.root / record["file_name"], self.resolution, self.channels)
        return image, str(record[self.key])


def _collate(batch):
    images, captions = zip(*batch, strict=True)
    return torch.stack(images), list(captions)


class ImageTextFolderDataModule(L.LightningDataModule):
    """Image-caption train / val loaders from an ``imagefolder`` folder (module docstring).

    Args:
        root: the folder holding ``metadata.jsonl`` and the images.
        resolution: side of the square training images in pixels (Monetico: 512).
        batch_size: pairs per batch.
        val_fraction: share of the pairs held out for validation (seeded draw; at least one).
        channels: 3 (RGB) or 1 (grey).
        caption_key: the caption field of ``metadata.jsonl``.
        num_workers: loader worker processes.
        seed: seeds the split and the training order.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.01,
        channels: int = 3,
        caption_key: str = "text",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if resolution < 1 or batch_size < 1 or channels not in (1, 3):
            raise ValueError(
                f"resolution={resolution} and batch_size={batch_size} must be >= 1, channels="
                f"{channels} must be 1 or 3"
            )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
        self.root, self.resolution, self.batch_size = Path(root), resolution, batch_size
        self.val_fraction, self.channels, self.caption_key = val_fraction, channels, caption_key
        self.num_workers, self.seed = num_workers, seed
        self.train_set = self.val_set = None

    def records(self) -> list[dict]:
        path = self.root / METADATA
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: give an imagefolder-style folder (images plus {METADATA} "
                f'lines {{"file_name": ..., "{self.caption_key}": ...}})'
            )
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        bad = [r for r in lines if "file_name" not in r or self.caption_key not in r]
        if not lines or bad:
            raise ValueError(
                f"{path}: every line needs 'file_name' and '{self.caption_key}' "
                f"({len(lines)} lines, {len(bad)} without them)"
            )
        return lines

    def setup(self, stage: str | None = None) -> None:
        records = self.records()
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.val_fraction * len(records))) if self.val_fraction else 0
        val = [records[i] for i in order[:n_val].tolist()]
        train = [records[i] for i in order[n_val:].tolist()] or val
        args = (self.root, self.resolution, self.channels, self.caption_key)
        self.train_set, self.val_set = ImageTextFolder(self.root, train, *args[1:]), None
        if val:
            self.val_set = ImageTextFolder(self.root, val, *args[1:])

    def _loader(self, data, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=_collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)
