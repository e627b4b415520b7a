"""Text-to-image Meissonic / Monetico: CLIP text conditioning and the Hub-layout loader.

``TextConditioner`` turns prompts into the ``cond`` dict ``MeissonicDenoiser`` reads, as the
reference pipeline builds it: each prompt is tokenized to the text encoder's
``max_position_embeddings`` (77 for CLIP; padded and truncated), run through a
``CLIPTextModelWithProjection`` with hidden states, and gives

- ``encoder_hidden_states [B, S, joint_attention_dim]`` = ``hidden_states[-2]`` (penultimate layer),
- ``pooled_projections [B, pooled_projection_dim]`` = ``text_embeds`` (the projected pooled output),
- ``micro_conds [B, 5]`` = (width, height, crop top, crop left, aesthetic score), defaults
  ``(resolution, resolution, 0, 0, 6)`` as in the pipeline.

The empty prompt ``""`` is the classifier-free-guidance null condition (the pipeline's default
negative prompt). ``MeissonicTextDenoiser`` keeps it, so that ``cond=None`` means the
unconditional branch: ``ProductTargetSpec(weight=w)`` (``second_cond: null``) is then CFG
``u + w (c - u)``, exactly as ``second_cond = <the null class>`` is for class-conditional models.

``load_text_image_model(folder_or_hub_id)`` builds the whole model from a pipeline folder in the
Hub layout (``MeissonFlow/Meissonic``, ``Collov-Labs/Monetico``), without remote code::

    <root>/transformer/   MeissonicTransformer (strict: the Hub parameter names)
    <root>/vqvae/         diffusers VQModel
    <root>/text_encoder/  CLIPTextModelWithProjection
    <root>/tokenizer/     CLIP tokenizer (AutoTokenizer)

Example::

    model = load_text_image_model("checkpoints/Monetico", local_files_only=True)
    cond = model.cond(["a cat wearing a hat"] * 4)      # dict of [4, ...] tensors
    sampler = SMCSampler(model.denoiser, num_steps=48, unmasking="maskgit",
                         schedule="maskgit_cosine", potential=ProductTarget(9.0))
    images = model.decode(sampler.sample(model.seq_len, cond=cond).best())
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .meissonic import MeissonicDenoiser, MeissonicTransformer
from .vq import VQTokenizer

__all__ = [
    "HUB_LAYOUT",
    "MeissonicTextDenoiser",
    "TextConditioner",
    "TextImageModel",
    "load_text_image_model",
]

#: the subfolders of a Meissonic / Monetico pipeline on the Hub
HUB_LAYOUT = ("transformer", "vqvae", "text_encoder", "tokenizer")
COND_KEYS = ("encoder_hidden_states", "pooled_projections", "micro_conds")
AESTHETIC_SCORE = 6.0  # the pipeline's micro_conditioning_aesthetic_score


class TextConditioner(nn.Module):
    """Prompts -> ``cond`` for ``MeissonicDenoiser`` (see the module docstring).

    Args:
        text_encoder: a ``transformers.CLIPTextModelWithProjection``.
        tokenizer: its tokenizer (a ``CLIPTokenizer``, or anything ``AutoTokenizer`` loads).
        resolution: image side in pixels, the default width / height micro-conditions.
        max_length: tokens per prompt (``None``: the encoder's ``max_position_embeddings``).
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer: Any,
        resolution: int,
        max_length: int | None = None,
    ):
        super().__init__()
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.max_length = int(max_length or text_encoder.config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        resolution: int,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        text_encoder_subfolder: str | None = "text_encoder",
        tokenizer_subfolder: str | None = "tokenizer",
        **kwargs: Any,
    ) -> TextConditioner:
        """Load the encoder and tokenizer from a folder or hub id (a pipeline root: its
        ``text_encoder/`` and ``tokenizer/``; pass ``None`` subfolders for bare folders).
        ``local_files_only`` and ``kwargs`` (e.g. ``revision``) go to both loaders."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        common = {"local_files_only": local_files_only, **kwargs}
        sub = {"subfolder": text_encoder_subfolder} if text_encoder_subfolder else {}
        encoder = CLIPTextModelWithProjection.from_pretrained(
            str(name_or_path), **sub, **common, **({"dtype": torch_dtype} if torch_dtype else {})
        )
        sub = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {}
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **sub, **common)
        return cls(encoder, tokenizer, resolution)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def forward(
        self,
        prompts: str | list[str],
        width: int | None = None,
        height: int | None = None,
        crop: tuple[int, int] = (0, 0),
        aesthetic_score: float = AESTHETIC_SCORE,
    ) -> dict[str, Tensor]:
        """``{'encoder_hidden_states', 'pooled_projections', 'micro_conds'}`` of ``prompts``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        micro = torch.tensor(
            [
                width or self.resolution,
                height or self.resolution,
                crop[0],
                crop[1],
                aesthetic_score,
            ],
            dtype=hidden.dtype,
            device=hidden.device,
        )
        return {
            "encoder_hidden_states": hidden,
            "pooled_projections": out.text_embeds,
            "micro_conds": micro.expand(len(prompts), -1).clone(),
        }

    def null_cond(self, **micro: Any) -> dict[str, Tensor]:
        """The CFG null condition: the empty prompt, ``[1, ...]`` tensors."""
        return self([""], **micro)


class MeissonicTextDenoiser(MeissonicDenoiser):
    """``MeissonicDenoiser`` for a text transformer that keeps the null condition (the empty
    prompt's ``cond``, ``[1, ...]`` tensors): ``cond=None`` uses it for every row, so the
    sampler's unconditional branch (``ProductTarget(second_cond=None)``) is CFG's."""

    def __init__(self, transformer: MeissonicTransformer, grid_shape, null_cond, **kwargs):
        super().__init__(transformer, grid_shape, **kwargs)
        missing = [k for k in COND_KEYS if k not in null_cond]
        if missing:
            raise ValueError(f"null_cond lacks {missing}; give TextConditioner.null_cond()")
        for key in COND_KEYS:
            value = null_cond[key]
            if value.shape[0] != 1:
                raise ValueError(f"null_cond[{key!r}] must have batch 1, got {tuple(value.shape)}")
            self.register_buffer(f"null_{key}", value.detach().clone(), persistent=False)

    def null(self, batch: int) -> dict[str, Tensor]:
        """The null condition for ``batch`` rows."""
        return {
            k: getattr(self, f"null_{k}").expand(batch, *getattr(self, f"null_{k}").shape[1:])
            for k in COND_KEYS
        }

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return super().forward(x_t, t, self.null(x_t.shape[0]) if cond is None else cond)


@dataclass
class TextImageModel:
    """A text-to-image Meissonic: denoiser over flattened grids, VQ tokenizer, text conditioner."""

    denoiser: MeissonicTextDenoiser
    vq: VQTokenizer
    text: TextConditioner

    @property
    def transformer(self) -> MeissonicTransformer:
        return self.denoiser.transformer

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.denoiser.grid_shape

    @property
    def seq_len(self) -> int:
        h, w = self.grid_shape
        return h * w

    def cond(self, prompts: str | list[str], **micro: Any) -> dict[str, Tensor]:
        """The sampler's ``cond`` for ``prompts`` (``""``: the null condition)."""
        return self.text(prompts, **micro)

    def to(self, device) -> TextImageModel:
        for part in (self.denoiser, self.vq, self.text):
            part.to(device)
        return self

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Token grids ``[B, h * w]`` -> images ``[B, C, H, W]`` in ``[0, 1]``."""
        return self.vq.decode(tokens.to(self.vq.codebook.device))


def load_text_image_model(
    name_or_path: str | Path,
    resolution: int | None = None,
    local_files_only: bool = False,
    torch_dtype: torch.dtype | None = None,
    timestep: str = "mask_fraction",
    num_steps: int | None = None,
    **kwargs: Any,
) -> TextImageModel:
    """A ``TextImageModel`` from a Meissonic / Monetico pipeline folder or hub id (module
    docstring), in eval mode and without remote code.

    Args:
        name_or_path: a local folder with ``transformer/``, ``vqvae/``, ``text_encoder/``,
            ``tokenizer/``, or a hub id (``Collov-Labs/Monetico``) resolved by the hub client.
        resolution: image side in pixels (``None``: 1024 when the transformer downsamples, as
            Meissonic, else 512, as Monetico); fixes the token grid (``resolution / 16``) and
            the default micro-conditions.
        local_files_only: passed to every loader (no network access when ``True``).
        torch_dtype: dtype of the transformer and text encoder (the VQ stays float32).
        timestep, num_steps: ``MeissonicDenoiser``'s timestep convention.
        kwargs: further loader keywords (e.g. ``revision``).
    """
    root = Path(name_or_path)
    if root.exists():
        missing = [sub for sub in HUB_LAYOUT if not (root / sub).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{root} is not a Meissonic / Monetico pipeline folder: it lacks {missing} (the "
                f"Hub layout is {'/, '.join(HUB_LAYOUT)}/); fetch one with e.g. "
                f"`huggingface-cli download Collov-Labs/Monetico --local-dir {root}`"
            )
    common = {"local_files_only": local_files_only, **kwargs}
    dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        transformer = MeissonicTransformer.from_pretrained(
            str(name_or_path), subfolder="transformer", **common, **dtype
        )
        if resolution is None:
            resolution = 1024 if transformer.config.downsample else 512
        vq = VQTokenizer.from_pretrained(
            str(name_or_path), image_size=resolution, subfolder="vqvae", **common
        )
        text = TextConditioner.from_pretrained(
            name_or_path, resolution, torch_dtype=torch_dtype, **common
        )
    except OSError as err:  # the hub client's "not cached / not found" (no local folder)
        if root.exists():
            raise
        raise FileNotFoundError(
            f"{name_or_path} is neither a local folder nor a hub pipeline the hub client could "
            f"provide (local_files_only={local_files_only}): {str(err).rstrip('.')}. Download it with "
            f"`huggingface-cli download {name_or_path} --local-dir <folder>` and pass <folder>"
        ) from err
    with torch.no_grad():
        null = text.null_cond()
    denoiser = MeissonicTextDenoiser(
        transformer.eval(), vq.grid_shape, null, timestep=timestep, num_steps=num_steps
    )
    return TextImageModel(denoiser.eval(), vq.eval(), text.eval())
