"""``VQTokenizer``: images <-> token grids through a diffusers ``VQModel``.

A thin layer over ``diffusers.VQModel`` (the tokenizer of aMUSEd, Meissonic and Monetico, and
of the embedded Fashion-MNIST model). Notation: ``B`` images of ``C`` channels and ``H × W``
pixels; a grid of ``h × w = (H / f) × (W / f)`` tokens, ``f = 2^(number of down blocks − 1)``
(each ``DownEncoderBlock2D`` but the last halves the size: ``28 → 14 → 7`` with three blocks,
``256 → 16`` with aMUSEd's five); ``K`` = ``codebook_size`` codes of dimension ``D``.

- ``encode(images [B, C, H, W]) -> tokens LongTensor [B, h, w]``: encoder, ``quant_conv``,
  nearest code (Euclidean) per cell;
- ``decode(tokens [B, h, w] or flattened [B, h*w]) -> images [B, C, H, W]``: codebook lookup,
  ``post_quant_conv``, decoder;
- ``decode_probs(probs [B, h*w, K] or [B, h, w, K])``: the decoder of the expected code
  embedding (differentiable, e.g. for a reward's gradient through soft one-hot tokens);
- ``forward(images) -> VQOutput(reconstruction, quantizer_loss, tokens)`` for training: the
  quantizer loss is diffusers' own (``VectorQuantizer``: codebook + commitment terms, straight-
  through gradients).

**Pixel range.** Images are in ``[0, 1]`` (Meissonic and aMUSEd feed ``VaeImageProcessor``
output with ``do_normalize=False``; ``FashionMNISTDataModule(value_range="unit")``); ``decode``
clamps its output to ``[0, 1]`` unless ``clamp=False``.

Loading and saving: ``VQTokenizer.from_pretrained(folder)`` reads a diffusers ``VQModel``
folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), e.g. a Meissonic or aMUSEd
checkpoint's ``vqvae/`` folder (``subfolder="vqvae"`` from the pipeline root; any config field of
those checkpoints, such as ``lookup_from_codebook`` or ``force_upcast``, is accepted);
``save_pretrained(folder)`` writes that format plus ``lsmc_vq.json`` (the image size, which the
``VQModel`` config does not hold reliably).

Example::

    tok = VQTokenizer(image_size=28)                 # the tiny Fashion-MNIST configuration
    tokens = tok.encode(images)                      # [B, 7, 7] in 0..255
    images_hat = tok.decode(tokens.flatten(1))       # [B, 1, 28, 28]
    tok = VQTokenizer.from_pretrained("Meissonic/vqvae", image_size=1024)  # grid 64 × 64
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import VQModel
from torch import LongTensor, Tensor, nn

__all__ = ["TINY_FMNIST_CONFIG", "VQOutput", "VQTokenizer"]

#: the embedded Fashion-MNIST tokenizer: 28×28×1 -> 7×7 tokens, 256 codes, ~0.94M parameters
TINY_FMNIST_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "num_vq_embeddings": 256,
    "norm_num_groups": 8,
    "sample_size": 28,
    "mid_block_add_attention": False,
}
EXTRA_FILE = "lsmc_vq.json"


class VQOutput(NamedTuple):
    """``reconstruction [B, C, H, W]`` (not clamped), ``quantizer_loss`` (scalar),
    ``tokens LongTensor [B, h, w]``."""

    reconstruction: Tensor
    quantizer_loss: Tensor
    tokens: LongTensor


class VQTokenizer(nn.Module):
    """Images <-> token grids with a diffusers ``VQModel`` (see the module docstring).

    Args:
        config: ``VQModel`` constructor arguments (``None``: ``TINY_FMNIST_CONFIG``); ignored
            when ``model`` is given.
        image_size: side of the (square) images, fixing ``grid_shape`` (``None``: the
            ``VQModel`` config's ``sample_size``).
        model: an existing ``VQModel`` to wrap (``from_pretrained`` passes it).
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        image_size: int | None = None,
        *,
        model: VQModel | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            model = VQModel(**(TINY_FMNIST_CONFIG if config is None else config))
        elif not isinstance(model, VQModel):
            raise TypeError(f"model must be a diffusers VQModel, got {type(model).__name__}")
        self.vq = model
        self.image_size = int(model.config.sample_size if image_size is None else image_size)
        if self.image_size < self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} is smaller than the VQModel's downsampling "
                f"factor {self.downsample_factor}: give the image side in pixels"
            )

    # ---- shapes -----------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """``K``: the number of codes (token ids ``0..K-1``)."""
        return int(self.vq.config.num_vq_embeddings)

    @property
    def channels(self) -> int:
        return int(self.vq.config.in_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the token grid of an ``image_size``-square image."""
        side = self.image_size
        for _ in range(len(self.vq.config.block_out_channels) - 1):
            side //= 2  # a DownEncoderBlock2D's pad-then-stride-2 conv: h -> h // 2
        return side, side

    @property
    def num_tokens(self) -> int:
        """``h * w``: the length of a flattened grid."""
        h, w = self.grid_shape
        return h * w

    @property
    def codebook(self) -> Tensor:
        """``[K, D]`` code embeddings."""
        return self.vq.quantize.embedding.weight

    # ---- images -> tokens ---------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images have shape {tuple(images.shape)}; this tokenizer takes [B, "
                f"{', '.join(map(str, expected))}] (channels, image_size, image_size)"
            )

    def latents(self, images: Tensor) -> Tensor:
        """Pre-quantization latents ``[B, D, h, w]`` (encoder + ``quant_conv``)."""
        self._check_images(images)
        return self.vq.encode(images).latents

    def quantize(self, latents: Tensor) -> tuple[Tensor, Tensor, LongTensor]:
        """``latents [B, D, h, w]`` -> (quantized ``[B, D, h, w]`` with straight-through
        gradients, diffusers' quantizer loss, tokens ``[B, h, w]``)."""
        z_q, loss, (_, _, index) = self.vq.quantize(latents)
        return z_q, loss, index.reshape(latents.shape[0], *latents.shape[2:]).long()

    def forward(self, images: Tensor) -> VQOutput:
        """Reconstruct ``images [B, C, H, W]`` through the quantizer (for training)."""
        z_q, loss, tokens = self.quantize(self.latents(images))
        return VQOutput(self.decode_latents(z_q), loss, tokens)

    @torch.no_grad()
    def encode(self, images: Tensor) -> LongTensor:
        """``images [B, C, H, W]`` in ``[0, 1]`` -> token grid ``LongTensor [B, h, w]``."""
        return self.quantize(self.latents(images))[2]

    # ---- tokens -> images ---------------------------------------------------------------------
    def _grid(self, tokens: Tensor) -> Tensor:
        h, w = self.grid_shape
        if tokens.dim() == 2 and tokens.shape[1] == h * w:
            tokens = tokens.reshape(-1, h, w)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (h, w):
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)}; expected [B, {h}, {w}] or the "
                f"flattened [B, {h * w}] (grid_shape of image_size={self.image_size})"
            )
        if tokens.dtype.is_floating_point:
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(
                f"token ids span [{int(tokens.min())}, {int(tokens.max())}]; the codebook holds "
                f"0..{self.codebook_size - 1} (a mask id or a padded-vocabulary id cannot be "
                "decoded: finish sampling first)"
            )
        return tokens.long()

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantized latents ``[B, D, h, w]`` -> images ``[B, C, H, W]`` (not clamped)."""
        # VQModel.decode's path after quantization, called directly so that checkpoints with
        # lookup_from_codebook=True (aMUSEd) and without it decode the same way
        h = self.vq.post_quant_conv(z_q)
        spatial = z_q if self.vq.config.norm_type == "spatial" else None
        return self.vq.decoder(h, spatial)

    def _finish(self, images: Tensor, clamp: bool) -> Tensor:
        return images.clamp(0.0, 1.0) if clamp else images

    def decode(self, tokens: Tensor, clamp: bool = True) -> Tensor:
        """Token grid ``[B, h, w]`` (or flattened ``[B, h*w]``) -> images ``[B, C, H, W]``."""
        grid = self._grid(tokens)
        z_q = self.vq.quantize.embedding(grid).permute(0, 3, 1, 2).contiguous()
        return self._finish(self.decode_latents(z_q), clamp)

    def decode_probs(self, probs: Tensor, clamp: bool = True) -> Tensor:
        """Distributions over codes ``[B, h*w, K]`` or ``[B, h, w, K]`` -> images, through the
        expected embedding ``probs @ codebook`` (differentiable in ``probs``)."""
        h, w = self.grid_shape
        if probs.shape[-1] != self.codebook_size or probs.shape[1:-1] not in ((h * w,), (h, w)):
            raise ValueError(
                f"probs have shape {tuple(probs.shape)}; expected [B, {h * w}, "
                f"{self.codebook_size}] or [B, {h}, {w}, {self.codebook_size}]"
            )
        z_q = (probs.to(self.codebook.dtype) @ self.codebook).reshape(probs.shape[0], h, w, -1)
        return self._finish(self.decode_latents(z_q.permute(0, 3, 1, 2).contiguous()), clamp)

    # ---- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the diffusers ``VQModel`` folder (safetensors) plus ``lsmc_vq.json``."""
        folder = Path(folder)
        self.vq.save_pretrained(folder, safe_serialization=True)
        extra = {"image_size": self.image_size, "pixel_range": [0.0, 1.0]}
        (folder / EXTRA_FILE).write_text(json.dumps(extra, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        image_size: int | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> VQTokenizer:
        """Load a diffusers ``VQModel`` folder (a Meissonic / aMUSEd ``vqvae/`` folder, or one
        written by ``save_pretrained``); ``image_size`` overrides ``lsmc_vq.json``, whose absence
        falls back to the config's ``sample_size``. ``kwargs`` go to ``VQModel.from_pretrained``
        (e.g. ``local_files_only=True``, ``torch_dtype``)."""
        local = Path(folder) / (subfolder or "")
        if Path(folder).exists() and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"{local} has no config.json: give a diffusers VQModel folder (a Meissonic / "
                "aMUSEd checkpoint's vqvae/ folder, or subfolder='vqvae' with the pipeline root)"
            )
        model = VQModel.from_pretrained(str(folder), subfolder=subfolder, **kwargs)
        extra_path = local / EXTRA_FILE
        if image_size is None and extra_path.is_file():
            image_size = int(json.loads(extra_path.read_text())["image_size"])
        return cls(image_size=image_size, model=model)
