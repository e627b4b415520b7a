"""The packaged image model (lightning_smc/assets/meissonic_fmnist_tiny) samples its classes."""

import warnings

import torch

from lightning_smc.evaluation.images import sample_images
from lightning_smc.methods import Method, ProductTargetSpec
from lightning_smc.metrics.image import class_accuracy
from lightning_smc.models.image import EMBEDDED_IMAGE, load_image_model


def test_embedded_image_model_is_trained_and_its_cfg_samples_show_their_class():
    """The trained asset loads (no fallback to a random model) and its class-conditional CFG
    samples are recognized by the committed classifier: at its card's accuracy (about 0.9 at
    1,000 samples) 30 samples fall below 0.6 with probability < 1e-4 (binomial), while a
    random model sits at chance (0.1)."""
    assert (EMBEDDED_IMAGE / "lsmc_image.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the random-model fallback warns
        model = load_image_model("embedded_image")
    assert model.grid_shape == (7, 7) and model.num_classes == 10 and model.vq is not None
    labels = torch.arange(10).repeat(3)
    method = Method(
        name="cfg",
        num_steps=8,
        schedule="maskgit_cosine",
        potential=ProductTargetSpec(weight=1.5, second_cond=model.null_class),
    )
    out = sample_images(method, model, labels, seed=0, batch_size=30)
    assert out.tokens.max() < 256 and out.images.shape == (30, 1, 28, 28)
    assert class_accuracy(out.images, labels) >= 0.6
