"""Adapters for the ICLR 2026 image rewards: ImageReward, the LAION aesthetic predictor, HPSv2.

Each is a ``VQImageReward`` (token grids ``[B, h*w]`` decoded through the VQ, float64 ``[B]``)
whose scorer comes from a third-party package and whose weights are read **only** from local
files: nothing is downloaded at run time. A missing package is an ``ImportError`` that says
``pip install <package>``; a missing weight file is a ``FileNotFoundError`` naming the package
and the file expected. None of them is differentiable here (``differentiable = False``).

=====================  ===================  =================================================
reward                 package              files in ``weights`` (a folder)
=====================  ===================  =================================================
``ImageRewardScore``   ``image-reward``     ``ImageReward.pt``, ``med_config.json`` (and the
                                            ``bert-base-uncased`` tokenizer in the HF cache)
``LaionAesthetic``     ``open_clip_torch``  ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP head)
                                            and ``open_clip_pytorch_model.bin`` (OpenAI
                                            CLIP ViT-L/14, loaded as ``ViT-L-14-quickgelu``)
``HPSv2Score``         ``hpsv2``            ``HPS_v2.1_compressed.pt`` (the full ViT-H-14)
=====================  ===================  =================================================

The text-conditioned scorers take one fixed ``prompt`` (the reward contract passes no
conditioning), e.g. ``"a photo of a sneaker"``. The pure-torch pieces, ``clip_preprocess``
(resize, center crop, CLIP normalization; differentiable) and ``AestheticHead`` (the LAION MLP,
state-dict keys ``layers.{0,2,4,6,7}``), work without the packages. Example::

    reward = LaionAesthetic("weights/laion_aesthetic", vq="embedded_image")
    reward(tokens)     # float64 [B]: the aesthetic score (about 1..10) of the decoded images
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .image import VQImageReward

__all__ = [
    "AestheticHead",
    "HPSv2Score",
    "ImageRewardScore",
    "LaionAesthetic",
    "clip_preprocess",
    "require_file",
    "require_package",
    "to_pil_images",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def require_package(module: str, pip_name: str, owner: str, expected: str) -> ModuleType:
    """``import module`` or an ``ImportError`` saying ``pip install pip_name``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{owner} needs the package {pip_name!r} (import {module}), which is not installed: "
            f"pip install {pip_name}; it then reads its weights from {expected} (never downloaded "
            "at run time)"
        ) from err


def require_file(path: Path, owner: str, pip_name: str) -> Path:
    """``path`` if it is a file, else a ``FileNotFoundError`` naming the package and the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{owner}: the {pip_name} weight file {path.name!r} is missing (expected at {path}); "
            "download it beforehand: this reward never downloads weights at run time"
        )
    return path


def to_pil_images(images: Tensor) -> list[Any]:
    """``images [B, C, H, W]`` in ``[0, 1]`` (``C`` = 1 or 3) -> RGB ``PIL.Image`` list."""
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()]


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """CLIP's input ``[B, 3, size, size]`` from images ``[B, C, H, W]`` in ``[0, 1]``: grey
    repeated to RGB, bicubic resize of the short side to ``size``, center crop, CLIP mean / std."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, 1 or 3, H, W]")
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0.0, 1.0)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP on L2-normalized CLIP image embeddings ``[B, embed_dim]`` -> ``[B]``:
    ``embed_dim → 1024 → 128 → 64 → 16 → 1`` (dropout between the first four; no activations)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | Path) -> AestheticHead:
        """Load ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict, read with weights_only)."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        head = cls(embed_dim=int(state["layers.0.weight"].shape[1]))
        head.load_state_dict(state, strict=True)
        return head.eval()


class _ClipFeatureReward(VQImageReward):
    """Shared by the CLIP-based scorers: ``encoder.encode_image`` on ``clip_preprocess`` input,
    L2-normalized, then ``score_features``."""

    image_size = 224

    def clip_features(self, images: Tensor) -> Tensor:
        x = clip_preprocess(images, self.image_size).to(self.device)
        features = self.encoder.encode_image(x).float()
        return features / features.norm(dim=-1, keepdim=True)


class LaionAesthetic(_ClipFeatureReward):
    """The LAION aesthetic predictor (v2, ``sac+logos+ava1-l14-linearMSE``) on decoded images.

    Args:
        weights: the folder holding ``head_file`` and ``clip_file`` (see the module docstring).
        vq, batch_size: see ``VQImageReward``.
        head_file, clip_file: file names inside ``weights``.
        clip_model: the ``open_clip`` architecture of ``clip_file``.
        encoder, head: already built modules (an ``encode_image`` module and an
            ``AestheticHead``), used instead of loading ``weights`` (tests, custom setups).
    """

    differentiable = False

    def __init__(
        self,
        weights: str | Path | None = None,
        vq: object = "embedded",
        head_file: str = "sac+logos+ava1-l14-linearMSE.pth",
        clip_file: str = "open_clip_pytorch_model.bin",
        clip_model: str = "ViT-L-14-quickgelu",
        batch_size: int | None = None,
        encoder: nn.Module | None = None,
        head: AestheticHead | None = None,
    ):
        super().__init__(vq, batch_size)
        if encoder is None or head is None:
            folder = Path(weights) if weights is not None else Path("<weights folder>")
            expected = f"{folder / head_file} and {folder / clip_file}"
            open_clip = require_package("open_clip", "open_clip_torch", "LaionAesthetic", expected)
            if weights is None:
                raise FileNotFoundError(
                    f"LaionAesthetic: give weights= a folder with the open_clip_torch files "
                    f"{head_file!r} and {clip_file!r}"
                )
            head = AestheticHead.from_file(
                require_file(folder / head_file, "LaionAesthetic", "open_clip_torch")
            )
            clip_path = require_file(folder / clip_file, "LaionAesthetic", "open_clip_torch")
            encoder = open_clip.create_model(clip_model, pretrained=str(clip_path))
        self.encoder = encoder.eval().requires_grad_(False).to(self.device)
        self.head = head.eval().requires_grad_(False).to(self.device)

    def score_images(self, images: Tensor) -> Tensor:
        return self.head(self.clip_features(images))


class HPSv2Score(_ClipFeatureReward):
    """Human Preference Score v2: the cosine similarity of HPSv2's (ViT-H-14) image and
    ``prompt`` embeddings, as ``hpsv2.score`` reports it.

    Args:
        weights: the folder holding ``checkpoint`` (``HPS_v2.1_compressed.pt`` or
            ``HPS_v2_compressed.pt``), whose ``state_dict`` is the whole CLIP model.
        prompt: the text the images are scored against.
        vq, batch_size: see ``VQImageReward``.
        clip_model: the architecture (``ViT-H-14``).
    """

    differentiable = False

    def __init__(
        self,
        weights: str | Path,
        prompt: str,
        vq: object = "embedded",
        checkpoint: str = "HPS_v2.1_compressed.pt",
        clip_model: str = "ViT-H-14",
        batch_size: int | None = None,
    ):
        super().__init__(vq, batch_size)
        path = Path(weights) / checkpoint
        require_package("hpsv2", "hpsv2", "HPSv2Score", str(path))
        require_file(path, "HPSv2Score", "hpsv2")
        open_clip = importlib.import_module("hpsv2.src.open_clip")
        # pretrained=None: no download; the checkpoint holds every weight
        model = open_clip.create_model_and_transforms(clip_model, None, device="cpu")[0]
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.encoder = model.eval().requires_grad_(False).to(self.device)
        self.prompt = prompt
        tokens = open_clip.get_tokenizer(clip_model)([prompt]).to(self.device)
        with torch.no_grad():
            text = self.encoder.encode_text(tokens).float()
        self.register_buffer("text_features", text[0] / text[0].norm(), persistent=False)

    def score_images(self, images: Tensor) -> Tensor:
        return self.clip_features(images) @ self.text_features


class ImageRewardScore(VQImageReward):
    """ImageReward (BLIP-based human-preference reward) of the decoded images for ``prompt``.

    Args:
        weights: the folder holding ``checkpoint`` and ``med_config`` (see the module
            docstring); the ``bert-base-uncased`` tokenizer must already be in the HF cache.
        prompt: the text the images are scored against.
        vq, batch_size: see ``VQImageReward``.
        device: where the scorer runs (default: the VQ's device).
    """

    differentiable = False

    def __init__(
        self,
        weights: str | Path,
        prompt: str,
        vq: object = "embedded",
        checkpoint: str = "ImageReward.pt",
        med_config: str = "med_config.json",
        batch_size: int | None = None,
    ):
        super().__init__(vq, batch_size)
        folder = Path(weights)
        expected = f"{folder / checkpoint} and {folder / med_config}"
        package = require_package("ImageReward", "image-reward", "ImageRewardScore", expected)
        ckpt = require_file(folder / checkpoint, "ImageRewardScore", "image-reward")
        config = require_file(folder / med_config, "ImageRewardScore", "image-reward")
        self.scorer = package.load(name=str(ckpt), device=str(self.device), med_config=str(config))
        self.scorer.eval().requires_grad_(False)
        self.prompt = prompt

    def score_images(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            scores = [float(self.scorer.score(self.prompt, pil)) for pil in to_pil_images(images)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
