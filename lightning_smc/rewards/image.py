"""Image rewards: token grids ``x0 [B, h*w]`` are decoded through the VQ and the images scored.

Every reward here maps token ids ``x0 LongTensor [B, L]`` (flattened ``h × w`` grids, ids in the
codebook ``0..K-1``) to float64 ``[B]``, validated by ``check_reward_output``. ``VQImageReward``
does the decoding (``VQTokenizer.decode``, pixels in ``[0, 1]``) and a subclass scores the images
``[B, C, H, W]`` with ``score_images``. A differentiable one (``ClassReward``) also takes soft
one-hot tokens ``s [B, L, V]`` (float; ``V`` = the denoiser's vocabulary, mask id included, as
``GradientProposal`` passes them): the columns ``0..K-1`` go through the expected code embedding
``s[..., :K] @ codebook`` and the VQ decoder (``VQTokenizer.decode_probs``); columns ``>= K``
(mask, padded ids) are ignored. An exact one-hot gives the same value as its ids.

========================  ================================================  ====================
reward                    score                                             differentiable
========================  ================================================  ====================
``ClassReward``           ``log p_clf(target | image)``, optionally         yes (SMCgrad)
                          clamped below at ``clamp_min``
``HoldoutClassReward``    the same with the holdout classifier              no: never steers
``JpegCompressibility``   ``-`` JPEG size in kB (quality 95)                no
``JpegIncompressibility`` ``+`` JPEG size in kB                             no
========================  ================================================  ====================

Adapters for ImageReward, the LAION aesthetic predictor and HPSv2 live in
``lightning_smc.rewards.image_adapters``. The reward contract passes no conditioning, so the
target class is fixed per reward (one reward per class). ``vq`` is a ``VQTokenizer``, an
``ImageModel``, ``"embedded"`` (the packaged ``assets/vq_fmnist_tiny``), an image model name
(``"embedded_image"``, ``"random_tiny_image"``), an image model folder or a ``VQModel`` folder.
Example::

    reward = ClassReward(target=7, vq="embedded", clamp_min=-10.0)   # 7 = Sneaker
    reward(tokens)              # float64 [B]: log p(Sneaker | decoded image)
    reward(soft_onehot)         # float64 [B], differentiable w.r.t. soft_onehot [B, L, V]
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..metrics.classifier import FashionMNISTClassifier, load_classifier
from ..models.loading import ASSETS
from ..models.vq import VQTokenizer
from .base import BaseReward, check_reward_output

__all__ = [
    "EMBEDDED_VQ",
    "ClassReward",
    "HoldoutClassReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "VQImageReward",
    "jpeg_sizes_kb",
    "resolve_vq",
]

#: the packaged Fashion-MNIST VQ tokenizer (28 × 28 -> 7 × 7 grids of 256 codes)
EMBEDDED_VQ = ASSETS / "vq_fmnist_tiny"


def resolve_vq(vq: object) -> VQTokenizer:
    """The ``VQTokenizer`` named by ``vq`` (see the module docstring), in eval mode."""
    from ..models.image import ImageModel, is_image_model, load_image_model

    if isinstance(vq, ImageModel):
        vq = vq.vq
    elif isinstance(vq, (str, Path)):
        if str(vq) == "embedded":
            vq = VQTokenizer.from_pretrained(EMBEDDED_VQ)
        elif is_image_model(vq):
            vq = load_image_model(vq).vq
        elif Path(vq).is_dir():
            vq = VQTokenizer.from_pretrained(vq)
        else:
            raise FileNotFoundError(
                f"vq={str(vq)!r} is neither 'embedded', an image model name nor a folder (a "
                "VQTokenizer.save_pretrained / diffusers VQModel folder or an image model folder)"
            )
    if not isinstance(vq, VQTokenizer):
        raise TypeError(
            f"vq must be a VQTokenizer, an ImageModel with a tokenizer or a folder, got "
            f"{type(vq).__name__}"
        )
    return vq.eval()


class VQImageReward(nn.Module, BaseReward):
    """Decode ``x0`` through a VQ, score the images: subclasses implement ``score_images``.

    Args:
        vq: the tokenizer (see the module docstring).
        batch_size: rows decoded and scored at once (``None``: all).

    The networks are frozen and stay in eval mode (``train()`` does not change that): a reward
    must score each row alone, never with batch statistics.
    """

    def __init__(self, vq: object = "embedded", batch_size: int | None = None):
        super().__init__()
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (or None: all rows at once)")
        self.vq = resolve_vq(vq).requires_grad_(False)
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return type(self).__name__

    def train(self, mode: bool = True) -> VQImageReward:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.vq.codebook.device

    def images(self, x0: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` of ids ``[B, L]`` or soft one-hots ``[B, L, V]``."""
        if not isinstance(x0, Tensor):
            raise TypeError(f"{self.name} expects a torch.Tensor, got {type(x0).__name__}")
        x0 = x0.to(self.device)
        if not x0.is_floating_point():
            return self.vq.decode(x0)
        K = self.vq.codebook_size
        if x0.dim() != 3 or x0.shape[-1] < K:
            raise ValueError(
                f"{self.name}: a soft input must be one-hot-like [B, L, V] with V >= the "
                f"codebook size {K} (columns >= {K}, e.g. the mask id, are ignored); got shape "
                f"{tuple(x0.shape)}"
            )
        return self.vq.decode_probs(x0[..., :K])

    def score_images(self, images: Tensor) -> Tensor:
        """``[B]`` scores of ``images [B, C, H, W]`` in ``[0, 1]``."""
        raise NotImplementedError

    def predict(self, x0: Tensor) -> Tensor:
        """The unchecked scores ``[B]`` (in chunks of ``batch_size``)."""
        size = self.batch_size or max(1, x0.shape[0])
        parts = [self.score_images(self.images(c)) for c in x0.split(size)]
        return torch.cat(parts) if parts else x0.new_zeros(0, dtype=torch.float32)

    def forward(self, x0: Tensor) -> Tensor:
        """The reward, float64 ``[B]`` (on ``x0``'s device), validated."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and x0.is_floating_point()):
            value = self.predict(x0)
        return check_reward_output(self, value, x0.shape[0]).to(x0.device)


class ClassReward(VQImageReward):
    """``log p_clf(target | image)`` from a Fashion-MNIST classifier; differentiable.

    Args:
        target: the class index (Fashion-MNIST: ``0..9``).
        vq, batch_size: see ``VQImageReward``.
        classifier: a ``FashionMNISTClassifier``, an asset name or a folder (default: the
            committed domain classifier ``fmnist_classifier_tiny``).
        clamp_min: clamp ``log p`` below at this value (``None``: no clamp); the gradient is
            zero where the clamp is active.
        success_threshold: success is ``reward > success_threshold``, in reward units
            (``None``: ``log 0.5``, i.e. ``p > 0.5``).
    """

    differentiable = True
    default_classifier = "fmnist_classifier_tiny"

    def __init__(
        self,
        target: int,
        vq: object = "embedded",
        classifier: str | Path | FashionMNISTClassifier | None = None,
        clamp_min: float | None = None,
        success_threshold: float | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(vq, batch_size)
        clf = classifier if classifier is not None else self.default_classifier
        if not isinstance(clf, nn.Module):
            clf = load_classifier(clf)
        self.classifier = clf.eval().requires_grad_(False)
        num_classes = int(self.classifier.config.num_classes)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < num_classes:
            raise ValueError(f"target={target!r} must be a class index in [0, {num_classes})")
        if clamp_min is not None and not math.isfinite(clamp_min):
            raise ValueError(f"clamp_min={clamp_min!r} must be a finite number or None")
        if self.vq.channels != 1 or self.vq.image_size != self.classifier.config.image_size:
            side = self.classifier.config.image_size
            raise ValueError(
                f"the classifier takes [B, 1, {side}, {side}] images but the VQ decodes "
                f"{self.vq.channels} channel(s) of {self.vq.image_size} × {self.vq.image_size}"
            )
        self.target, self.clamp_min = target, clamp_min
        self.success_threshold = math.log(0.5) if success_threshold is None else success_threshold

    @property
    def name(self) -> str:
        return f"{type(self).__name__}[{self.target}]"

    def score_images(self, images: Tensor) -> Tensor:
        log_p = torch.log_softmax(self.classifier(images).float(), dim=-1)[:, self.target]
        return log_p if self.clamp_min is None else log_p.clamp_min(self.clamp_min)

    def success(self, x0: Tensor) -> Tensor:
        """Bool ``[B]``: reward above ``success_threshold``."""
        with torch.no_grad():
            return self(x0) > self.success_threshold

    def extra_repr(self) -> str:
        return f"target={self.target}, clamp_min={self.clamp_min}"


class HoldoutClassReward(ClassReward):
    """``ClassReward`` with the holdout classifier (``fmnist_classifier_holdout_tiny``: another
    architecture and seed). It evaluates steered samples and must never steer them, so it is not
    offered to ``GradientProposal`` (``differentiable = False``)."""

    differentiable = False
    default_classifier = "fmnist_classifier_holdout_tiny"


def jpeg_sizes_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG sizes in kB (1000 bytes) of ``images [B, C, H, W]`` in ``[0, 1]`` (``C`` = 1 or 3),
    quantized to uint8 and saved by PIL at ``quality``; float32 ``[B]`` on ``images``' device."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, 1 or 3, H, W]")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        pil = Image.fromarray(
            np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)
        )
        pil.save(buffer, format="JPEG", quality=quality)
        sizes.append(len(buffer.getvalue()) / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(VQImageReward):
    """``-`` the JPEG size in kB of the decoded image (smaller files score higher), as in the
    DDPO / ICLR 2026 image code (PIL, quality 95). Not differentiable; needs no weights."""

    sign = -1.0

    def __init__(self, vq: object = "embedded", quality: int = 95, batch_size: int | None = None):
        super().__init__(vq, batch_size)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality={quality} must lie in [1, 100] (PIL's JPEG quality)")
        self.quality = int(quality)

    def images(self, x0: Tensor) -> Tensor:
        if x0.is_floating_point():
            raise TypeError(
                f"{self.name} is not differentiable: give token ids [B, L], not a soft input"
            )
        return super().images(x0)

    def score_images(self, images: Tensor) -> Tensor:
        return self.sign * jpeg_sizes_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """``+`` the JPEG size in kB of the decoded image (larger files score higher)."""

    sign = 1.0
