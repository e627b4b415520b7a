"""``FashionMNISTDataModule``: idx parsing, seeded disjoint splits, value ranges, named errors.

Tests that read the data skip when Debian's dataset-fashion-mnist is not installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_smc.data.images import (
    DEFAULT_ROOT,
    FashionMNISTDataModule,
    load_fashion_mnist,
    read_idx,
)

HAVE_DATA = (Path(DEFAULT_ROOT) / "train-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA,
    reason=f"Fashion-MNIST absent from {DEFAULT_ROOT}: apt-get install dataset-fashion-mnist",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")


def test_missing_files_name_the_package_and_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*root="):
        load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="value_range"):
        FashionMNISTDataModule(value_range="01")


@needs_data
def test_splits_are_seeded_disjoint_and_in_range():
    dm = FashionMNISTDataModule(batch_size=16, val_size=1000, seed=0)
    train, val, test = dm.split("train"), dm.split("val"), dm.split("test")
    assert (len(train), len(val), len(test)) == (59000, 1000, 10000)
    images, _ = load_fashion_mnist()
    as_rows = {bytes(im) for im in val.images}
    assert not any(bytes(im) in as_rows for im in train.images[:5000])  # no val image in train
    assert sorted(np.bincount(test.labels).tolist()) == [1000] * 10
    other = FashionMNISTDataModule(val_size=1000, seed=1).split("val")
    assert not np.array_equal(other.labels, val.labels)  # the seed draws the split
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    sym = FashionMNISTDataModule(value_range="symmetric").split("test")[0][0]
    assert float(sym.min()) == -1.0 and float(sym.max()) <= 1.0
    assert torch.allclose(sym, test[0][0] * 2 - 1)
