"""Running a method on a class-conditional image model: ``sample_images``, grids and files.

``sample_images(method, model, labels)`` draws one image per label with the shared sampler
(``methods.build_sampler``): ``cond`` is the label (the sampler expands it to the particles; a
``ProductTargetSpec`` potential's ``second_cond`` is CFG's null class), sample ``i`` uses the
generator seeded by ``derive_seed(seed, i)`` as in ``run_method``, so an image depends only on
its index and label, not on ``batch_size``. The answer is the highest-weight particle
(``methods.answers``), decoded through the model's VQ. ``ImageSamples`` keeps the tokens (codebook
ids only), images ``[S, C, H, W]`` in ``[0, 1]``, labels, final normalized log-weights ``[S, N]``
and the ESS trace ``[S, T]``, per-image NFE (per particle sequence, as ``nfe``) and seconds ``[S]``
(its batch's; the batch's wall time shared equally, decoding excluded); with ``strip=True`` also the particles of sample 0 just
before and just after its first resample (``ParticleStrip``; masked cells painted grey).

``run_image_config(config)`` runs a method config file whose ``model`` is an image model
(``models.image``; what ``python -m lightning_smc.sample`` does for one): ``seq_len`` must be the
grid's ``h * w``; the labels are ``image_labels``'s. ``image_grid(images, nrow)`` tiles images; ``save_png`` writes one; ``write_image_outputs(out,
samples)`` writes ``samples.npz`` and ``grid_<name>.png`` per method plus ``summary.json``::

    result = sample_images(Method(num_steps=8, schedule="maskgit_cosine"), model, range(10))
    save_png(image_grid(result.images, nrow=10), "grid.png")
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..methods import Method, answers, build_sampler
from ..smc import derive_seed

__all__ = [
    "ImageSamples",
    "ParticleStrip",
    "image_grid",
    "image_labels",
    "run_image_config",
    "sample_images",
    "save_png",
    "to_png_array",
    "write_image_outputs",
]


@dataclass
class ParticleStrip:
    """One prompt's ``N`` particles after step ``step`` (``before``) and after the resample that
    followed (``after``, with ``ancestors``), as images ``[N, C, H, W]``."""

    step: int
    before: Tensor
    after: Tensor
    ancestors: Tensor


@dataclass
class ImageSamples:
    name: str
    labels: Tensor  # [S] int64
    tokens: Tensor  # [S, h * w] codebook ids
    images: Tensor | None  # [S, C, H, W] in [0, 1]; None without a VQ
    log_weights: Tensor  # [S, N] float64, normalized
    ess: Tensor  # [S, T] float64
    resampled: Tensor  # [S, T] bool
    nfe: float
    seconds: float
    strip: ParticleStrip | None = None
    scores: dict[str, Tensor] | None = None  # "reward" / "holdout" [S] of the answers
    sample_nfe: Tensor | None = None  # [S] float64: its batch's NFE per particle sequence
    sample_seconds: Tensor | None = None  # [S] float64: its batch's wall time / batch size

    @classmethod
    def concat(cls, parts: Sequence[ImageSamples]) -> ImageSamples:
        """Blocks of one method's samples (e.g. the ranks' label blocks, in order) as one set:
        per-sample fields joined, NFE and seconds the per-sample means, the strip the first
        block's; ``images`` and ``scores`` are left to the caller (decode / score the whole)."""
        if not parts:
            raise ValueError("ImageSamples.concat needs at least one block of samples")
        if len(parts) == 1:
            return parts[0]
        if any(p.sample_nfe is None or p.sample_seconds is None for p in parts):
            raise ValueError("ImageSamples.concat needs sample_nfe / sample_seconds on every block")

        def cat(field: str) -> Tensor:
            return torch.cat([getattr(p, field) for p in parts])

        sample_nfe, sample_seconds = cat("sample_nfe"), cat("sample_seconds")
        return dataclasses.replace(
            parts[0], labels=cat("labels"), tokens=cat("tokens"), images=None, scores=None,
            log_weights=cat("log_weights"), ess=cat("ess"), resampled=cat("resampled"),
            nfe=float(sample_nfe.mean()), seconds=float(sample_seconds.mean()),
            sample_nfe=sample_nfe, sample_seconds=sample_seconds,
        )  # fmt: skip

    def summary(self) -> dict[str, float]:
        """Mean final ESS, resamples per sample, NFE and seconds per sample (and the mean
        reward / holdout score of the answers when a config gave them)."""
        final = torch.exp(-torch.logsumexp(2 * self.log_weights, dim=-1))
        out = {
            "ess": float(final.mean()),
            "resamples": float(self.resampled.sum(-1).double().mean()),
            "nfe": float(self.nfe),
            "seconds": float(self.seconds),
        }
        out.update({k: float(v.double().mean()) for k, v in (self.scores or {}).items()})
        return out


def _device(denoiser: Any) -> torch.device:
    return next(iter(denoiser.parameters())).device


def sample_images(
    method: Method,
    model: Any,
    labels: Sequence[int] | Tensor,
    seed: int = 0,
    batch_size: int = 16,
    strip: bool = False,
    progress_bar: bool = False,
    reward: Any = None,
    guide: Any = None,
    amortized: Any = None,
    offset: int = 0,
) -> ImageSamples:
    """One image per label with ``method`` on ``model`` (an ``ImageModel``); module docstring.
    ``amortized``: ``build_sampler``'s; ``offset``: the global index of ``labels[0]`` when they
    are one shard of a larger set (sample ``i`` is seeded by ``derive_seed(seed, offset + i)``)."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels).long()
    if labels.dim() != 1 or not len(labels):
        raise ValueError(f"labels must be a non-empty list of class ids, got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) > model.null_class:
        raise ValueError(
            f"labels must lie in [0, {model.null_class}] ({model.null_class} = null class), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if offset < 0:
        raise ValueError(f"offset={offset} must be >= 0 (the global index of labels[0])")
    sampler = build_sampler(
        method, model.denoiser, reward, amortized, progress_bar=progress_bar, guide=guide
    )
    device = _device(model.denoiser)
    parts, nfe, start, found = [], 0.0, time.perf_counter(), None
    sample_nfe, sample_seconds = [], []
    for lo in range(0, len(labels), batch_size):
        batch_start = time.perf_counter()
        ids = range(lo, min(lo + batch_size, len(labels)))
        seeds = [derive_seed(seed, offset + i) for i in ids]
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        cond = labels[lo : ids.stop].to(device)
        record = strip and lo == 0 and method.num_particles > 1
        out = sampler.sample(model.seq_len, cond=cond, generator=gens, record_path=record)
        parts.append((answers(out, method, reward).cpu(), out))
        nfe += float(out.nfe) * len(ids)
        if record:
            found = _first_resample(model, out)
        sample_nfe += [float(out.nfe)] * len(ids)
        sample_seconds += [(time.perf_counter() - batch_start) / len(ids)] * len(ids)
    tokens = torch.cat([p[0] for p in parts])
    images = model.decode(tokens).cpu() if model.vq is not None else None
    return ImageSamples(
        name=method.name,
        labels=labels,
        tokens=tokens,
        images=images,
        log_weights=torch.cat([p[1].log_weights.cpu() for p in parts]),
        ess=torch.cat([p[1].ess.cpu() for p in parts]),
        resampled=torch.cat([p[1].resampled.cpu() for p in parts]),
        nfe=nfe / len(labels),
        seconds=(time.perf_counter() - start) / len(labels),
        strip=found,
        sample_nfe=torch.tensor(sample_nfe, dtype=torch.float64),
        sample_seconds=torch.tensor(sample_seconds, dtype=torch.float64),
    )


def _first_resample(model: Any, out: Any) -> ParticleStrip | None:
    """Prompt 0's particles around its first resample (``None``: it never resampled)."""
    steps = out.resampled[0].nonzero().flatten()
    if not len(steps) or model.vq is None or out.path is None:
        return None
    k, N = int(steps[0]), out.log_weights.shape[1]
    before = out.path.x_to[k][:N]
    after = out.path.x_from[k + 1][:N]
    return ParticleStrip(
        k, _partial_images(model, before), _partial_images(model, after), out.ancestors[0, k].cpu()
    )


def _partial_images(model: Any, x: Tensor) -> Tensor:
    """Decode partly masked grids ``[N, h * w]``: masked cells are painted mid-grey."""
    masked = x == model.denoiser.mask_id
    images = model.decode(torch.where(masked, torch.zeros_like(x), x)).cpu()
    h, w = model.grid_shape
    cells = masked.view(-1, 1, h, w).float().cpu()
    cover = torch.nn.functional.interpolate(cells, size=images.shape[-2:], mode="nearest")
    return torch.where(cover.bool(), torch.full_like(images, 0.5), images)


def image_grid(images: Tensor, nrow: int = 8, pad: int = 2) -> Tensor:
    """Tile ``images [B, C, H, W]`` (``[0, 1]``) into one ``[C, rows * (H + pad) + pad, ...]``
    image, ``nrow`` per row, on a white background."""
    B, C, H, W = images.shape
    nrow = max(1, min(nrow, B))
    rows = (B + nrow - 1) // nrow
    grid = images.new_ones(C, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top : top + H, left : left + W] = images[i]
    return grid


def to_png_array(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` in ``[0, 1]`` -> uint8 ``[H, W]`` (grey) or ``[H, W, 3]``."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write ``image [C, H, W]`` in ``[0, 1]`` as a PNG (parent folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_png_array(image)).save(path)
    return path


def image_labels(
    model: Any, num_samples: int, prompt: str | None = None, prompts: str | None = None
) -> list[int]:
    """The class of each sample: ``prompt`` (a class id or name) for all ``num_samples``; the
    ``prompts`` file (one class id or name a line); else ``0, 1, ..., C - 1`` repeated to
    ``num_samples``. The null class ``C`` is allowed (unconditional samples)."""
    if prompt is not None and prompts is not None:
        raise ValueError("--prompt and --prompts together: give one class or one file")
    if prompts is not None:
        lines = [line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts {prompts} holds no class")
        return [_class_id(model, line, f"--prompts {prompts}") for line in lines]
    if prompt is not None:
        return [_class_id(model, prompt, "--prompt")] * num_samples
    return [i % model.num_classes for i in range(num_samples)]


def _class_id(model: Any, text: str, where: str) -> int:
    names = [n.lower() for n in model.class_names or ()]
    if text.lower() in names:
        return names.index(text.lower())
    if text.isdigit() and int(text) <= model.null_class:
        return int(text)
    raise ValueError(
        f"{where}: {text!r} is not a class of this model: give an id in 0..{model.null_class} "
        f"({model.null_class} = null class, unconditional)"
        + (f" or a name of {list(model.class_names)}" if model.class_names else "")
    )


def run_image_config(config: Any, device: str = "cpu", prompt: str | None = None) -> ImageSamples:
    """Sample a method config (``methods.MethodConfig``) whose ``model`` is an image model."""
    from ..models.image import load_image_model

    model = load_image_model(config.model).to(device)
    if config.seq_len != model.seq_len:
        h, w = model.grid_shape
        raise ValueError(
            f"seq_len={config.seq_len}, but this image model's token grid is {h} x {w}: give "
            f"seq_len: {model.seq_len}"
        )
    labels = image_labels(model, config.num_samples, prompt, config.prompts)
    result = sample_images(
        config.method,
        model,
        labels,
        config.seed,
        config.batch_size,
        strip=True,
        progress_bar=True,
        reward=config.reward,
        guide=config.guide,
    )
    scorers = {"reward": config.reward, "holdout": config.holdout}
    with torch.no_grad():
        result.scores = {k: f(result.tokens).cpu() for k, f in scorers.items() if f is not None}
    return result


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def write_image_outputs(
    out: str | Path, results: Sequence[ImageSamples], nrow: int = 10
) -> dict[str, dict[str, float]]:
    """Per method: ``grid_<name>.png`` (and ``strip_<name>.png``); for all: ``summary.json`` and
    ``samples.npz`` with ``tokens`` (codebook ids ``[S, h * w]``), ``images`` (uint8 ``[S, C, H,
    W]``), ``labels``, ``log_weights`` ``[S, N]`` and ``ess`` ``[S, T]``; with several methods each
    key is prefixed by the method (``<name>.tokens``). Returns the summaries."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, summaries = {}, {}
    for result in results:
        key = _slug(result.name)
        prefix = "" if len(results) == 1 else f"{key}."
        arrays[f"{prefix}tokens"] = result.tokens.numpy()
        arrays[f"{prefix}labels"] = result.labels.numpy()
        arrays[f"{prefix}log_weights"] = result.log_weights.numpy()
        arrays[f"{prefix}ess"] = result.ess.numpy()
        if result.images is not None:
            arrays[f"{prefix}images"] = (result.images.clamp(0, 1) * 255).round().byte().numpy()
            save_png(image_grid(result.images, nrow), out / f"grid_{key}.png")
        if result.strip is not None:
            strip = torch.cat([result.strip.before, result.strip.after])
            save_png(image_grid(strip, len(result.strip.before)), out / f"strip_{key}.png")
        summaries[result.name] = result.summary()
    np.savez_compressed(out / "samples.npz", **arrays)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries
