"""``ImageEvaluation``: named sampling methods on a class-conditional image model, at validation.

Each method (a ``methods.Method``: the plain sampler, CFG as ``ProductTargetSpec``, or a
reward-steering method of ``configs/methods/images/``: SMC under ``RewardTiltSpec``, best-of-N,
the gradient or the amortized proposal) is run by ``evaluation.images.sample_images`` (the shared
sampler, built by ``methods.build_sampler``) on the module's image model
(``pl_module.image_model()``: its denoiser and VQ) for the fixed ``labels``, sample ``i`` with
the generator seeded by ``derive_seed(seed, i)``: the same labels and seeds at every validation
and for every method.

The steering reward is ``reward`` (e.g. ``rewards.ClassReward``), else the module's ``reward``
(``AmortizedProposalModule``); a method that needs one (``Method.needs_reward``) without any is an
error when fitting starts. ``guide`` is ``GradientProposalSpec``'s differentiable surrogate. On a
module with a LoRA proposal ``q`` (``AmortizedProposalModule``) the methods sample ``p_theta``
(``q.base_denoiser``, the adapter off) and a ``DenoiserProposalSpec`` proposes from the module's
current ``q_phi`` (``pl_module.proposal``: with the CFG of its training when it has one).

Logged per method ``name``:

- ``eval/<name>/ess`` (mean final ESS), ``eval/<name>/resamples``, ``eval/<name>/nfe``,
  ``eval/<name>/seconds`` (per image; under DDP the mean of each image's batch time);
- with a reward: ``eval/<name>/reward`` (mean reward of the answers) and, when the reward has a
  success threshold (``metrics.registry.success_threshold_of``), ``eval/<name>/success`` (the
  fraction above it); with ``holdout``: ``eval/<name>/holdout`` (its mean); each with ``_se``
  (``metrics.MetricSet``, as ``RewardEvaluation``);
- ``eval/<name>/accuracy``: top-1 accuracy of the domain classifier (``classifier``, a
  ``metrics.classifier`` folder or asset name) on the samples against their labels;
- ``eval/<name>/fid``, ``eval/<name>/isc``, ... (``fidelity``: torch-fidelity metrics of
  ``metrics.image`` against the first ``reference_size`` test images of the data module);
- an image grid (``eval/<name>/grid``) and, for a method with more than one particle, a strip of
  sample 0's particles just before (top) and just after (bottom) its first resample
  (``eval/<name>/strip``; masked cells grey): as ``wandb.Image`` with a ``WandbLogger``, and
  always as PNGs under ``<default_root_dir>/image_eval/step<k>/``.

When ``metrics.image`` (torch-fidelity, the classifier) cannot be imported or the classifier is
missing, accuracy / FID / IS are skipped with one printed note naming why; the rest still runs.
The evaluation runs at the first validation batch, while an ``EMAWeightAveraging`` callback's
weights are swapped in (they are swapped back before ``on_validation_epoch_end``). Under
``fast_dev_run`` each method runs as a smoke test: at most 4 labels, 2 particles and 4 steps.

**Under DDP** every rank runs the callback and samples its contiguous block of the labels
(``dist.shard_indices``; an image depends only on its global index, never on the rank or batch).
The tokens, log-weights, ESS traces and per-sample NFE / seconds are gathered in label order, and
every rank decodes and scores the whole set, so every number is the single process's (up to the
float rounding of the weights, which depend on the batch's composition); accuracy and FID / IS
are computed by rank zero and shared. Rank zero writes the media; the scalars are logged from
every rank with identical values (``sync_dist``, ``reduce_fx="max"`` keeps them exact).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from .. import dist
from ..evaluation.images import ImageSamples, image_grid, sample_images, save_png, to_png_array
from ..methods import Method
from ..metrics.registry import MetricSet, success_threshold_of
from ..rewards import BaseReward, check_reward_output

__all__ = ["ImageEvaluation"]

SCORED = ("reward", "success", "holdout")  # the MetricSet metrics of the scorers


class ImageEvaluation(L.Callback):
    """Args:
    methods: the ``Method``s to run (names must be unique).
    labels: the class of each sample (default: ``0, 1, ..., num_classes - 1`` repeated to
        ``num_samples``).
    num_samples: samples per method when ``labels`` is not given.
    seed: seeds sample ``i``'s generator (``derive_seed(seed, i)``).
    batch_size: labels per sampler call (results do not depend on it).
    classifier: the class-accuracy classifier (``metrics.classifier.load_classifier`` name or
        folder); ``None``: no accuracy.
    fidelity: torch-fidelity metrics (``fid``, ``isc``, ``kid``, ``prc``) against the data
        module's test images; empty: none.
    reference_size: test images in the reference set of ``fidelity``.
    every_n_validations: run at the 1st, (k+1)-th, ... validation.
    nrow: images per grid row.
    reward: the steering reward (a reward object, e.g. ``rewards.ClassReward``; default: the
        module's ``reward``, if it has one).
    holdout: a different scorer reported alongside (not steered on).
    guide: a differentiable surrogate for ``GradientProposalSpec`` methods (``build_sampler``).
    """

    def __init__(
        self,
        methods: list[Method],
        labels: list[int] | None = None,
        num_samples: int = 20,
        seed: int = 0,
        batch_size: int = 20,
        classifier: str | None = "fmnist_classifier_tiny",
        fidelity: list[str] | None = None,
        reference_size: int = 1000,
        every_n_validations: int = 1,
        nrow: int = 10,
        reward: BaseReward | None = None,
        holdout: BaseReward | None = None,
        guide: BaseReward | None = None,
    ) -> None:
        if not methods:
            raise ValueError("ImageEvaluation needs at least one method")
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"ImageEvaluation method names must be unique, got {names}")
        if labels is not None and not labels:
            raise ValueError("ImageEvaluation labels must be a non-empty list (or None)")
        if num_samples < 1 or batch_size < 1 or every_n_validations < 1 or reference_size < 1:
            raise ValueError(
                "num_samples, batch_size, reference_size and every_n_validations must be >= 1"
            )
        for field, scorer in (("reward", reward), ("holdout", holdout), ("guide", guide)):
            if scorer is not None and not callable(scorer):
                raise ValueError(
                    f"ImageEvaluation: {field} must be a reward object (token ids [B, L] -> "
                    f"scores [B], e.g. class_path: lightning_smc.rewards.ClassReward with "
                    f"init_args), got {type(scorer).__name__} {scorer!r}"
                )
        sharded = [m.name for m in methods if m.shard_particles]
        if sharded:
            raise ValueError(
                f"ImageEvaluation: methods {sharded} have shard_particles: true, but the callback "
                "shards the labels over the DDP ranks; set shard_particles: false"
            )
        self.methods, self.labels, self.num_samples = methods, labels, num_samples
        self.seed, self.batch_size, self.classifier = seed, batch_size, classifier
        self.fidelity, self.reference_size = list(fidelity or []), reference_size
        self.every, self.nrow = every_n_validations, nrow
        self.reward, self.holdout, self.guide = reward, holdout, guide
        self.validations = 0
        self.history: list[dict[str, Any]] = []
        self.last_samples: dict[str, ImageSamples] = {}  # the whole set, on every rank
        self._notes: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A method that needs a reward without any fails now, before training starts."""
        if stage == "fit":
            self._reward(pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0:
            return
        self.validations += 1
        if (self.validations - 1) % self.every:
            return
        results = self.evaluate(pl_module, trainer, smoke=bool(trainer.fast_dev_run))
        self.history.append({"step": trainer.global_step, **results})
        for name, row in results.items():
            for key, value in row.items():
                # identical on every rank (computed from the gathered set): "max" keeps it exact
                pl_module.log(
                    f"eval/{name}/{key}", value, batch_size=1, sync_dist=True, reduce_fx="max"
                )
        if trainer.is_global_zero:
            self._save_media(trainer)

    # ------------------------------------------------------------------ work
    def _labels(self, model: Any, smoke: bool) -> list[int]:
        labels = self.labels
        if labels is None:
            labels = [i % model.num_classes for i in range(self.num_samples)]
        return list(labels[:4]) if smoke else list(labels)

    def _reward(self, pl_module: L.LightningModule) -> Any:
        """The steering reward (``reward``, else the module's); checks the methods need none
        when there is none."""
        reward = self.reward if self.reward is not None else getattr(pl_module, "reward", None)
        needy = [m.name for m in self.methods if m.needs_reward]
        if reward is None and needy:
            raise ValueError(
                f"ImageEvaluation: methods {needy} need a reward (a RewardTiltSpec potential or "
                "select: reward), but neither the callback nor the module has one; give reward: "
                "(e.g. class_path: lightning_smc.rewards.ClassReward, init_args: {target: 7, "
                "vq: embedded_image})"
            )
        return reward

    def evaluate(
        self, pl_module: L.LightningModule, trainer: L.Trainer | None = None, smoke: bool = False
    ) -> dict[str, dict[str, float]]:
        """``{method name: {metric: value}}`` for the module's image model now, over every rank
        of the process group (every rank must call it)."""
        model, reward = pl_module.image_model(), self._reward(pl_module)
        lora = getattr(pl_module, "q", None)
        amortized = None if lora is None else getattr(pl_module, "proposal", lora)
        sampled = model if lora is None else _WithDenoiser(model, lora.base_denoiser)
        labels = self._labels(model, smoke)
        was_training = pl_module.training
        pl_module.eval()
        results = {}
        try:
            for method in self.methods:
                if smoke:
                    method = dataclasses.replace(
                        method,
                        num_particles=min(method.num_particles, 2),
                        num_steps=min(method.num_steps, 4),
                    )
                samples = self._sample(method, sampled, labels, reward, amortized)
                self.last_samples[method.name] = samples
                results[method.name] = {
                    **samples.summary(),
                    **self._scores(samples, reward, pl_module.device),
                    **dist.on_rank_zero(
                        lambda s=samples: self._quality(s, trainer, pl_module.device),
                        what="ImageEvaluation's image metrics",
                    ),
                }
        finally:
            pl_module.train(was_training)
        return results

    def _sample(
        self, method: Method, model: Any, labels: list[int], reward: Any, amortized: Any
    ) -> ImageSamples:
        """This rank's block of ``labels`` sampled, every rank's gathered in label order."""
        world = dist.world_size()
        mine = dist.shard_indices(len(labels), world, dist.rank())
        local = None
        if mine:
            local = sample_images(
                method, model, [labels[i] for i in mine], seed=self.seed,
                batch_size=self.batch_size, strip=mine[0] == 0, reward=reward, guide=self.guide,
                amortized=amortized, offset=mine[0],
            )  # fmt: skip
        if world == 1:
            return local
        if local is not None:
            local.images = None  # decoded below from all tokens at once, as in one process
        parts = [p for p in dist.all_gather_object(local) if p is not None]
        samples = ImageSamples.concat(parts)
        if model.vq is not None:
            samples.images = model.decode(samples.tokens).cpu()
        return samples

    def _scores(self, samples: ImageSamples, reward: Any, device: Any) -> dict[str, float]:
        """Reward / success / holdout of the answers (``MetricSet``; every rank scores the
        whole gathered set: the single process's numbers); kept in ``samples.scores``."""
        scorers = {"reward": reward, "holdout": self.holdout}
        with torch.no_grad():
            samples.scores = {
                key: check_reward_output(f, f(samples.tokens.to(device)), len(samples.tokens)).cpu()
                for key, f in scorers.items()
                if f is not None
            }
        if not samples.scores:
            return {}
        metrics = MetricSet(
            defaults=SCORED,
            reward=reward is not None,
            holdout=self.holdout is not None,
            success_threshold=None if reward is None else success_threshold_of(reward),
            sync=False,
        )
        index = torch.arange(len(samples.tokens))
        metrics.update(
            SimpleNamespace(index=index, **{"reward": None, "holdout": None, **samples.scores})
        )
        return metrics.compute()

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.add(text)
            rank_zero_info(f"ImageEvaluation: {text}")

    def _quality(self, samples: ImageSamples, trainer, device) -> dict[str, float]:
        """Class accuracy and torch-fidelity metrics (each optional; skipped with a note)."""
        if samples.images is None:
            self._note("the image model has no VQ: no accuracy, FID or IS")
            return {}
        if self.classifier is None and not self.fidelity:
            return {}
        try:
            from ..metrics import image as image_metrics
        except ImportError as err:
            self._note(f"image metrics unavailable ({err}): no accuracy, FID or IS")
            return {}
        out = {}
        if self.classifier is not None:
            try:
                out["accuracy"] = float(
                    image_metrics.class_accuracy(samples.images, samples.labels, self.classifier)
                )
            except (FileNotFoundError, OSError, ValueError) as err:
                self._note(f"classifier {self.classifier!r} unavailable ({err}): no accuracy")
        reference = self._reference(trainer)
        if self.fidelity and reference is not None:
            out.update(
                image_metrics.image_metrics(
                    samples.images,
                    reference,
                    metrics=self.fidelity,
                    cuda=device.type == "cuda",
                    isc_splits=min(10, len(samples.images)),
                )
            )
        return out

    def _reference(self, trainer) -> torch.Tensor | None:
        """The first ``reference_size`` test images of the data module (uint8), or ``None``."""
        split = getattr(getattr(trainer, "datamodule", None), "split", None)
        if not callable(split):
            if self.fidelity:
                self._note(f"no data module with a test split: {self.fidelity} skipped")
            return None
        return split("test").uint8_images()[: self.reference_size]

    def _save_media(self, trainer: L.Trainer) -> None:
        """PNGs under ``<default_root_dir>/image_eval/step<k>/``; ``wandb.Image``s with W&B."""
        from lightning.pytorch.loggers import WandbLogger

        folder = Path(trainer.default_root_dir) / "image_eval" / f"step{trainer.global_step:07d}"
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for name, samples in self.last_samples.items():
            media = {}
            if samples.images is not None:
                media["grid"] = image_grid(samples.images, self.nrow)
            if samples.strip is not None:
                strip = torch.cat([samples.strip.before, samples.strip.after])
                media["strip"] = image_grid(strip, len(samples.strip.before))
            for kind, grid in media.items():
                save_png(grid, folder / f"{kind}_{_slug(name)}.png")
                for logger in wandb_loggers:
                    caption = f"labels {samples.labels.tolist()}" if kind == "grid" else (
                        f"particles after step {samples.strip.step} (top) and after the resample "
                        f"(bottom; ancestors {samples.strip.ancestors.tolist()})"
                    )  # fmt: skip
                    logger.log_image(
                        key=f"eval/{name}/{kind}",
                        images=[to_png_array(grid)],
                        step=trainer.global_step,
                        caption=[caption],
                    )


class _WithDenoiser:
    """``model`` (an ``ImageModel``) sampled through another ``denoiser`` (``p_theta`` of a LoRA
    module: ``q.base_denoiser``); everything else (VQ, grid, classes) is the model's."""

    def __init__(self, model: Any, denoiser: Any) -> None:
        self._model, self.denoiser = model, denoiser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
