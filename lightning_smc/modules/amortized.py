"""Training the amortized proposal (SMCamot): a LoRA adapter ``q_phi`` and ``F_psi(t)``.

Target: the reward tilt ``p_theta(x) exp(r(x) / alpha)`` with twist ``log gamma_t = lambda_t
r_hat(x_t) / alpha`` (``potentials.RewardTilt``; the rollouts' sampler is ``methods.build_sampler``
of ``Method(potential=RewardTiltSpec(alpha, schedule, num_samples),
proposal=DenoiserProposalSpec())`` with the module's LoRA ``q_phi`` as the proposal). For a transition ``x_t -> x_s`` that commits
tokens at positions ``C``,

    log w = log gamma_s(x_s) - log gamma_t(x_t) + sum_{i in C} [log p_theta(x_s^i | x_t)
                                                             - log q_phi(x_s^i | x_t)]

and the log-variance loss is ``E[(log w - F_psi(t))^2]`` over transitions drawn from a
reference distribution that does not depend on the parameters: rollouts of the **shared
sampler** with ``q_phi`` as its proposal, under stop-gradient (on-policy), or transitions from a
replay buffer of earlier rollouts. If ``q_phi`` is the locally optimal proposal
``p_theta(x_s | x_t) gamma_s(x_s) / E_p[gamma_s | x_t]`` and the twist is consistent, every
``log w`` is zero and so is the loss. ``F_psi`` absorbs per-time offsets ("per_step": one scalar
per step, or "mlp": a small MLP in ``t``). An optional ``kl_weight`` adds
``KL(q_phi || p_theta)`` at the masked positions.

Only the adapter and ``F_psi`` are trained; the base weights are frozen and shared (the adapter
is switched off to evaluate ``p_theta``). Each rollout's randomness is derived from ``(seed,
global_step, global rollout index)`` and the choice of transitions from ``(seed, global_step)``,
so ``W`` DDP ranks drawing ``rollouts`` each compute the same loss terms as one process drawing
``W * rollouts`` (DDP averages equal-sized per-rank means: the same gradient up to rounding).
The replay buffer is part of the checkpoint (per rank), so training resumes exactly. At the end of fitting the adapter is written in peft's format (plus
``F_psi`` and the base fingerprint) to ``export_dir`` (default ``<default_root_dir>/adapter``),
ready for ``DenoiserProposal`` through ``LoRADenoiser.from_adapter``.

**Image backbones.** ``base`` may name an image model (``"embedded_image"``, an
``ImagePretraining`` folder: ``models.image.load_image_model``); ``classes`` then gives the class
label of every rollout (``cond`` per row, expanded to its particles by the sampler, stored with
the replay buffer), and ``log_normalizer="mlp_cond"`` makes ``F_psi(t, c)`` a function of the
time and the class. ``guidance=w`` puts classifier-free guidance inside the rollouts: the
reference ``p_theta`` is the **normalized CFG kernel** ``log_softmax(w log p(.|x_t, c) + (1 - w)
log p(.|x_t, null))`` (``models.lora.GuidedDenoiser``; ``w`` = Meissonic's guidance scale, logits
``u + w (c - u)``) and ``q_phi`` is the same combination of the adapted network's two branches
(so a zero adapter is exactly the reference). The target is then the distribution of the
standard CFG sampler (ancestral unmasking, ``num_steps`` steps), tilted: ``pi(x0) propto
p_CFG(x0 | c) exp(r(x0) / alpha)``, with ``log w`` above using ``log p_CFG`` in place of
``log p_theta``: the weights stay exact for this target (the CFG product of experts
``p^w p_null^(1 - w)`` of ``ProductTargetSpec`` is a different target: its weights carry the
mixture's normalizers). ``reward_warmup_steps`` anneals the reward weight: at global step ``k``
the rollouts and the loss use ``alpha_k = alpha / min(1, (k + 1) / reward_warmup_steps)``
(validation always uses ``alpha``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..methods import DenoiserProposalSpec, Method, RewardTiltSpec, build_sampler
from ..models.lora import GuidedDenoiser, LoRADenoiser
from ..potentials import get_twist_schedule
from ..rewards import BaseReward
from ..sampler import SMCSampler
from ..sampling.output import SMCPath
from ..smc import derive_seed, ess
from .log_variance import (
    LogNormalizer,
    log_variance_loss,
    paired_twist_change,
    sibling_log_weights,
    transition_log_weights,
)

__all__ = [
    "AmortizedProposalModule",
    "LogNormalizer",
    "log_variance_loss",
    "transition_log_weights",
]


#: the training settings written beside the adapter by ``save_adapter``
TRAINING_RECORD = "lsmc_amortized.json"

#: integer keys of ``derive_seed`` for each source of randomness
_STAGES = {"train": 0, "transitions": 1, "val": 2, "replay": 3, "paired": 4, "siblings": 5}


class _Steps(Dataset):
    """``steps_per_epoch`` indices: training needs no data, only fresh rollouts."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


class AmortizedProposalModule(L.LightningModule):
    """Train ``q_phi`` (LoRA on the base denoiser) and ``F_psi`` with the log-variance loss.

    Args:
        base: a checkpoint folder (``"embedded"``: the packaged model), an image model
            (``"embedded_image"``, ``"random_tiny_image"``, an ``ImagePretraining`` folder), a
            text-to-image pipeline (with ``prompts``) or a denoiser module.
        reward: an ``ls.Reward`` (any, not necessarily differentiable).
        potential: the ``RewardTilt`` target and its twist, as in a method config
            (``RewardTiltSpec(alpha, schedule, num_samples)``; the reward is ``reward``).
        seq_len, num_steps, unmasking: the rollouts (``num_steps`` transitions each).
        rollouts: sequences per training step; ``rollout_particles`` > 1 draws them with SMC
            resampling (each row still a path of the recorded transitions).
        transitions: transitions per rollout used in the loss (sampled steps; ``None``: all).
        lora_rank, lora_alpha, target_modules, lora_dropout: the adapter.
        log_normalizer: ``F_psi`` kind, ``"per_step"``, ``"mlp"`` (of ``t``) or ``"mlp_cond"``
            (of ``t`` and the class / prompt: ``log_variance.LogNormalizer``).
        baseline: what ``q_phi``'s loss subtracts from ``log w``: ``"f_psi"`` (the learned
            ``F_psi(t)``, the paper's loss) or ``"batch_mean"`` (the mean ``log w`` of the
            batch's transitions at the same step, detached: the per-step sample variance of
            ``log w``, "VarGrad"; it never lags behind as a slowly learned ``F_psi`` does while
            ``q_phi`` moves), or ``"per_state"``: ``siblings`` draws of every transition from
            the same state and positions, each ``log w`` against their mean
            (``log_variance.sibling_log_weights``): the only baseline whose minimum is the
            locally optimal proposal itself (needs ``unmasking="ancestral"`` and
            ``twist_estimate="paired"``; the siblings' twists use ``twist_samples``).
            ``F_psi`` is trained either way (its own squared error) and saved.
        siblings: draws per transition for ``baseline="per_state"`` (>= 2).
        lr, normalizer_lr: learning rates of the adapter and of ``F_psi``.
        kl_weight: weight of ``KL(q_phi || p_theta)``.
        twist_estimate: ``"rollout"``: the loss uses the twists the rollout recorded (one
            independent ``r_hat`` per state, as the sampler draws them); ``"paired"``: it
            re-estimates each transition's twist change with ``twist_samples`` x0 draws shared
            by both states (``log_variance.paired_twist_change``): the same expected gradient,
            with most of ``r_hat``'s Monte-Carlo noise removed.
        twist_samples: x0 draws per state for ``"paired"`` (0: the most likely x0, deterministic).
        replay_size: 0 trains on-policy; > 0 keeps that many recent rollouts and draws every
            step's transitions uniformly from them.
        init_adapter: start from a saved adapter (a folder written by ``save_adapter``;
            ``"embedded"``: the packaged one) instead of a zero adapter: its LoRA weights (its own
            rank and targets: ``lora_*`` and ``target_modules`` must be left at their defaults)
            and its ``F_psi`` (same ``num_steps`` and ``log_normalizer`` kind).
        steps_per_epoch, seed: loop length per epoch and the seed of all randomness.
        export_dir: where ``on_fit_end`` writes the adapter (default ``<root>/adapter``).
        classes: class labels of the rollouts (class-conditional bases): rollout ``i`` of the
            ``W * rollout_prompts`` rollouts of step ``k`` is conditioned on
            ``classes[(k * W * rollout_prompts + i) % len(classes)]``; ``None``: ``cond=None``
            (text; an image model's null class).
        guidance: classifier-free guidance scale ``w`` of the reference and of ``q_phi``
            (module docstring); ``None``: no guidance (the conditional model).
        null_class: the class label of CFG's unconditional branch (``None``: ``cond=None``).
        lora_init: peft's ``init_lora_weights``, ``true`` or ``"gaussian"`` (both start at the
            base: ``lora_B = 0``).
        weight_decay: AdamW weight decay of the adapter (``F_psi`` has none).
        reward_warmup_steps: anneal the reward weight ``1 / alpha`` linearly over the first
            that many steps (0: none; see the module docstring).
        schedule: the rollouts' ``alpha(t)`` (``Method.schedule``; ``maskgit_cosine`` for
            image-token models).
        prompts: text-to-image bases (Meissonic / Monetico): ``base`` is then a pipeline folder
            or hub id (``models.text_cond.load_text_image_model``, Hub timestep convention
            ``step_index``), the prompts are encoded once, and rollout ``i`` of step ``k`` is
            conditioned on prompt ``(k * W * rollout_prompts + i) % len(prompts)``;
            ``F_psi(t, c)`` (``mlp_cond``) embeds the prompt's index. Not with ``classes``.
        local_files_only: load the text-to-image pipeline without network access.
        resolution: its image side in pixels (``None``: the pipeline's default, Monetico 512,
            Meissonic 1024); ``seq_len`` must be its token grid's ``h * w``.
    """

    def __init__(
        self,
        base: Any = "embedded",
        reward: BaseReward | None = None,
        potential: RewardTiltSpec = RewardTiltSpec(),
        seq_len: int = 64,
        num_steps: int = 32,
        unmasking: str = "ancestral",
        rollouts: int = 8,
        rollout_particles: int = 1,
        transitions: int | None = 8,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        target_modules: Sequence[str] | None = None,
        lora_dropout: float = 0.0,
        log_normalizer: str = "per_step",
        baseline: str = "f_psi",
        siblings: int = 4,
        lr: float = 1e-4,
        normalizer_lr: float = 1e-2,
        kl_weight: float = 0.0,
        twist_estimate: str = "rollout",
        twist_samples: int = 1,
        replay_size: int = 0,
        init_adapter: str | None = None,
        steps_per_epoch: int = 100,
        seed: int = 0,
        export_dir: str | None = None,
        classes: Sequence[int] | None = None,
        guidance: float | None = None,
        null_class: int | None = None,
        lora_init: bool | str = True,
        weight_decay: float = 0.0,
        reward_warmup_steps: int = 0,
        schedule: str = "linear",
        prompts: Sequence[str] | None = None,
        local_files_only: bool = False,
        resolution: int | None = None,
    ):
        super().__init__()
        if reward is None:
            raise ValueError("AmortizedProposalModule needs reward= (an ls.Reward)")
        for name, value in (("rollouts", rollouts), ("num_steps", num_steps), ("seq_len", seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if transitions is not None and transitions < 1:
            raise ValueError(f"transitions must be >= 1 or null (all), got {transitions}")
        if replay_size < 0 or kl_weight < 0:
            raise ValueError("replay_size and kl_weight must be >= 0")
        if baseline not in ("f_psi", "batch_mean", "per_state"):
            raise ValueError(
                f"baseline={baseline!r}: choose 'f_psi' (learned F_psi(t)), 'batch_mean' "
                "(the batch's mean log w per step) or 'per_state' (siblings of each transition)"
            )
        if baseline == "per_state":
            if isinstance(siblings, bool) or not isinstance(siblings, int) or siblings < 2:
                raise ValueError(
                    f"siblings must be an int >= 2 for baseline='per_state', got {siblings!r}"
                )
            if unmasking != "ancestral" or twist_estimate != "paired":
                raise ValueError(
                    "baseline='per_state' draws siblings on the recorded positions, which needs "
                    f"unmasking='ancestral' (got {unmasking!r}) and twist_estimate='paired' "
                    f"(got {twist_estimate!r}; the siblings' twists use twist_samples)"
                )
        if twist_estimate not in ("rollout", "paired"):
            raise ValueError(
                f"twist_estimate={twist_estimate!r}: choose 'rollout' (the rollout's own twists) "
                "or 'paired' (re-estimated with common random numbers)"
            )
        if (
            isinstance(twist_samples, bool)
            or not isinstance(twist_samples, int)
            or twist_samples < 0
        ):
            raise ValueError(
                f"twist_samples must be an int >= 0 (0: greedy x0), got {twist_samples!r}"
            )
        if reward_warmup_steps < 0 or weight_decay < 0:
            raise ValueError("reward_warmup_steps and weight_decay must be >= 0")
        if reward_warmup_steps and replay_size and twist_estimate == "rollout":
            raise ValueError(
                "reward_warmup_steps with replay_size > 0 needs twist_estimate='paired': the "
                "replayed rollouts recorded their twists under an earlier reward weight"
            )
        if classes is not None and prompts is not None:
            raise ValueError("give classes (class-conditional base) or prompts (text), not both")
        if prompts is not None:
            prompts = [str(p) for p in prompts]
            if not prompts:
                raise ValueError("prompts must be a non-empty list of strings (or null)")
        if classes is not None:
            classes = [int(c) for c in classes]
            if not classes or min(classes) < 0:
                raise ValueError(f"classes must be a non-empty list of labels >= 0, got {classes}")
        if guidance is not None and not (float(guidance) > 0 and math.isfinite(guidance)):
            raise ValueError(f"guidance must be a finite scale > 0 (or null), got {guidance!r}")
        self.save_hyperparameters(ignore=["reward", "base", "potential"])
        self.hparams["classes"] = classes
        self.hparams["prompts"] = prompts
        # as plain values: a checkpoint holds tensors and plain containers only (weights_only)
        self.hparams["potential"] = dataclasses.asdict(potential)
        self.base_source = base
        self.prompt_cond: dict[str, Tensor] | None = None  # encoded prompts (not a parameter)
        denoiser = self._load_base(base)
        for p in denoiser.parameters():
            p.requires_grad_(False)
        num_classes = len(prompts) if prompts is not None else _num_classes(denoiser)
        if classes is not None and (num_classes is None or max(classes) > num_classes):
            raise ValueError(
                f"classes={classes}: the base has {num_classes or 'no'} classes (labels "
                f"0..{num_classes} with the null class); give labels it knows, or classes: null"
            )
        if log_normalizer == "mlp_cond" and num_classes is None:
            raise ValueError(
                "log_normalizer='mlp_cond' is F_psi(t, class): the base is not class-conditional "
                "(no num_classes); use 'per_step' or 'mlp'"
            )
        self.f_psi = LogNormalizer(num_steps, log_normalizer, num_classes=num_classes or 0)
        if init_adapter is None:
            self.q = LoRADenoiser(
                denoiser, lora_rank, lora_alpha, target_modules, lora_dropout, init=lora_init
            )
        else:
            self.q = self._start_from(denoiser, init_adapter)
        self.reward = reward
        self.method = Method(  # the rollouts' method: q_phi under the tilt (temperature 1, exact)
            name="rollout",
            num_particles=rollout_particles,
            num_steps=num_steps,
            unmasking=unmasking,
            schedule=schedule,
            potential=potential,
            proposal=DenoiserProposalSpec(),
        )
        self.rollout_sampler()  # builds the target now: bad settings fail here, not in fit
        self.replay: list[SMCPath] = []
        self.replay_cond: list[Tensor | None] = []  # the rows' class labels, with the buffer

    def _start_from(self, denoiser: nn.Module, adapter: str) -> LoRADenoiser:
        """``q_phi`` and ``F_psi`` from a saved adapter folder (trainable)."""
        from ..models.files import read_safetensors
        from ..models.image import resolve_image_adapter
        from ..models.loading import resolve_adapter

        hp = self.hparams
        defaults = {
            "lora_rank": 8,
            "lora_alpha": 16.0,
            "target_modules": None,
            "lora_dropout": 0.0,
            "lora_init": True,
        }
        changed = [k for k, v in defaults.items() if hp[k] != v]
        if changed:
            raise ValueError(
                f"init_adapter={adapter!r} brings its own LoRA settings; leave {changed} at their "
                "defaults (the adapter's adapter_config.json decides them)"
            )
        image = str(adapter) == "embedded_image"
        folder = resolve_image_adapter(adapter) if image else resolve_adapter(adapter)
        q = LoRADenoiser.from_adapter(denoiser, folder, trainable=True)
        state = read_safetensors(folder / "f_psi.safetensors")
        try:
            self.f_psi.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"init_adapter={adapter!r}: its F_psi ({folder / 'f_psi.safetensors'}) does not fit "
                f"num_steps={hp.num_steps}, log_normalizer={hp.log_normalizer!r}: {err}"
            ) from None
        return q

    def _load_base(self, base: Any) -> nn.Module:
        """A module as it is; with ``prompts`` a text-to-image pipeline (its prompts encoded
        into ``prompt_cond``); an image model name or folder through ``load_image_model`` (its
        denoiser); anything else through the text loader ``load_denoiser``."""
        hp = self.hparams
        if hp.prompts is not None:
            if isinstance(base, nn.Module):
                raise ValueError(
                    "prompts need a text-to-image pipeline as base (a folder or hub id, or a "
                    "models.text_cond.TextImageModel), which encodes them; got a bare "
                    f"{type(base).__name__}"
                )
            from ..models.text_cond import TextImageModel, load_text_image_model

            model = base
            if not isinstance(base, TextImageModel):
                try:
                    model = load_text_image_model(
                        base,
                        resolution=hp.resolution,
                        local_files_only=hp.local_files_only,
                        timestep="step_index",
                        num_steps=hp.num_steps,
                    )
                except FileNotFoundError as err:
                    raise FileNotFoundError(
                        f"base={str(base)!r}: {err} (the pipelines: `huggingface-cli download "
                        f"Collov-Labs/Monetico --local-dir {base}` or MeissonFlow/Meissonic)"
                    ) from err
            with torch.no_grad():
                cond = model.cond(list(hp.prompts))
            self.prompt_cond = {k: v.detach().cpu() for k, v in cond.items()}
            return model.denoiser
        if isinstance(base, nn.Module):
            return base
        from ..models.image import is_image_model, load_image_model

        if is_image_model(base):
            self._image = load_image_model(base)  # its VQ decodes samples: image_model()
            return self._image.denoiser
        from ..models.loading import load_denoiser

        return load_denoiser(base)

    # ------------------------------------------------------------------ networks and target
    _image: Any = None  # the image base (not a submodule: the checkpoint holds q and F_psi)

    def image_model(self) -> Any:
        """The image base (``models.image.ImageModel``), e.g. for ``callbacks.ImageEvaluation``.
        peft adapted its denoiser in place: it computes ``q_phi``; ``p_theta`` is
        ``self.q.base_denoiser``."""
        if self._image is None:
            base = self.base_source
            base = base if isinstance(base, str | Path) else type(base).__name__
            raise ValueError(
                f"image_model(): base={base!r} is not an image model; give an image "
                "model name or folder as base (embedded_image, random_tiny_image, ...)"
            )
        return self._image

    @property
    def reference(self) -> Any:
        """``p_theta`` of the target: the base (adapter off), CFG-combined with ``guidance``."""
        return self._guided(self.q.base_denoiser)

    @property
    def proposal(self) -> Any:
        """``q_phi``: the adapted network, CFG-combined like the reference with ``guidance``."""
        return self._guided(self.q)

    def _guided(self, network: Any) -> Any:
        hp = self.hparams
        if hp.guidance is None:
            return network
        return GuidedDenoiser(network, hp.guidance, hp.null_class)

    def alpha_at(self, step: int | None = None) -> float:
        """The tilt's ``alpha`` at global step ``step`` (``None``: the target's own ``alpha``):
        ``alpha / min(1, (step + 1) / reward_warmup_steps)`` while the reward weight warms up."""
        alpha, warmup = self.method.potential.alpha, self.hparams.reward_warmup_steps
        if step is None or not warmup:
            return alpha
        return alpha / min(1.0, (step + 1) / warmup)

    # ------------------------------------------------------------------ sampling
    def rollout_sampler(
        self, num_particles: int | None = None, alpha: float | None = None
    ) -> SMCSampler:
        """The shared sampler drawing from ``q_phi`` under the tilt (``self.method``, built by
        ``methods.build_sampler`` with this module's reward, reference and LoRA proposal;
        ``alpha``: the tilt's, default the target's)."""
        method = self.method
        if num_particles is not None:
            method = dataclasses.replace(method, num_particles=num_particles)
        if alpha is not None:
            method = dataclasses.replace(
                method, potential=dataclasses.replace(method.potential, alpha=alpha)
            )
        return build_sampler(method, self.reference, reward=self.reward, amortized=self.proposal)

    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the trainer this module is attached to (``(0, 1)`` alone)."""
        trainer = self._trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def rollout_prompts(self) -> int:
        """Independent rollouts (SMC runs) this rank draws per step: ``rollouts / particles``."""
        hp = self.hparams
        return max(hp.rollouts // hp.rollout_particles, 1)

    def _generators(
        self, stage: str, step: int | None = None, device: Any = "cpu"
    ) -> list[torch.Generator]:
        """One generator per rollout of this rank at ``step`` (default: the global step), seeded
        by the rollout's **global** index ``rank * rollout_prompts + i``: rollout ``j`` of a
        step is the same whichever rank draws it, so ``W`` ranks with ``rollouts`` each draw
        exactly the rollouts that one process with ``W * rollouts`` draws."""
        step = self.global_step if step is None else step
        rank, _ = self._world()
        count = self.rollout_prompts()
        return [
            torch.Generator(device=device).manual_seed(
                derive_seed(self.hparams.seed, _STAGES[stage], step, rank * count + i)
            )
            for i in range(count)
        ]

    def rollout_labels(self, step: int | None = None) -> Tensor | None:
        """The condition of each rollout of this rank at ``step`` ``[rollout_prompts]``: its
        class label (``classes``) or its prompt's index (``prompts``); ``None`` without either."""
        hp = self.hparams
        options = hp.classes if hp.classes is not None else hp.prompts
        if options is None:
            return None
        step = self.global_step if step is None else step
        rank, world = self._world()
        count = self.rollout_prompts()
        first = step * world * count + rank * count
        picked = [(first + i) % len(options) for i in range(count)]
        if hp.classes is not None:
            picked = [hp.classes[i] for i in picked]
        return torch.tensor(picked, dtype=torch.long, device=self.device)

    def network_cond(self, ids: Tensor | None) -> Any:
        """What the networks read for condition ids ``[R]`` (``rollout_labels``): the labels
        themselves, or the prompts' embeddings (a dict of ``[R, ...]`` tensors)."""
        if ids is None or self.prompt_cond is None:
            return ids
        return {k: v.to(self.device)[ids.to(v.device)] for k, v in self.prompt_cond.items()}

    def rollout(
        self, stage: str = "train", step: int | None = None, alpha: float | None = None
    ) -> SMCPath:
        """``rollouts`` sequences from the shared sampler with ``q_phi`` (no gradient); the path
        carries the rows' class labels as ``path.cond`` (``None`` without ``classes``)."""
        hp = self.hparams
        labels = self.rollout_labels(step)
        was_training = self.q.training
        self.q.eval()
        try:
            out = self.rollout_sampler(alpha=alpha).sample(
                hp.seq_len,
                batch_size=self.rollout_prompts(),
                cond=self.network_cond(labels),
                generator=self._generators(stage, step, self.device),
                device=self.device,
                record_path=True,
            )
        finally:
            self.q.train(was_training)
        path = out.path
        path.cond = None if labels is None else labels.repeat_interleave(hp.rollout_particles)
        return path

    # ------------------------------------------------------------------ loss
    def loss_on(
        self,
        path: SMCPath,
        step: int | None = None,
        cond: Tensor | None = None,
        alpha: float | None = None,
    ) -> dict[str, Tensor]:
        """The loss terms of the transitions in ``path`` (``step``: the global step whose seeds
        the ``"paired"`` twist estimate uses; default the current one; ``cond``: the rows'
        class labels ``[R]``, default ``path.cond`` as ``rollout`` sets it; ``alpha``: the
        tilt's, default ``alpha_at(step)``)."""
        step = self.global_step if step is None else step
        cond = getattr(path, "cond", None) if cond is None else cond
        alpha = self.alpha_at(step) if alpha is None else alpha
        if self.hparams.baseline == "per_state":
            return self._sibling_loss(path, step, cond, alpha)
        change = None
        if self.hparams.twist_estimate == "paired":
            change = self.paired_twist_change(path, step, cond, alpha)
        log_w, kl = transition_log_weights(
            path,
            self.reference,
            self.proposal,
            self.q.mask_id,
            cond=self.network_cond(cond),
            kl=self.hparams.kl_weight > 0,
            twist_change=change,
        )
        offset = self._f_psi(path, cond)
        loss = log_variance_loss(log_w, offset)
        out = {"log_variance": loss.detach(), "log_w_var": log_w.detach().var(dim=1).mean()}
        if self.hparams.baseline == "batch_mean":
            # q_phi against the batch's own per-step mean; F_psi fitted to log w on its own
            mean = log_w.detach().mean(dim=1, keepdim=True)
            loss = log_variance_loss(log_w, mean) + log_variance_loss(log_w.detach(), offset)
        if path.x_from.shape[0] == self.hparams.num_steps:  # a whole rollout: its own weights
            used = change if change is not None else path.twist_to - path.twist_from
            out.update(_rollout_diagnostics(path, log_w.detach() - used.to(log_w), self.hparams))
        if kl is not None:
            out["kl"] = kl.mean().detach()
            loss = loss + self.hparams.kl_weight * kl.mean()
        out["loss"] = loss
        return out

    def _row_generators(self, stage: str, step: int, rows: int) -> list[torch.Generator]:
        """One CPU generator per path row, seeded by ``(seed, stage, step, global row index)``:
        every world size draws the same numbers for a row."""
        rank, _ = self._world()
        return [
            torch.Generator().manual_seed(
                derive_seed(self.hparams.seed, _STAGES[stage], step, rank * rows + r)
            )
            for r in range(rows)
        ]

    def _f_psi(self, path: SMCPath, cond: Tensor | None) -> Tensor:
        """``F_psi`` of the path's transitions, ``[K, 1]`` (``[K, R]`` with ``mlp_cond`` and
        per-row labels)."""
        if cond is not None:
            cond = cond.to(self.device)
        offset = self.f_psi(path.step.to(self.device), path.t.to(self.device), cond)
        return offset.unsqueeze(1) if offset.dim() == 1 else offset

    def _sibling_loss(
        self, path: SMCPath, step: int, cond: Tensor | None, alpha: float
    ) -> dict[str, Tensor]:
        """``baseline="per_state"``: the mean within-state sample variance of the siblings'
        ``log w`` for ``q_phi``, ``F_psi``'s squared error on the recorded transitions."""
        hp = self.hparams
        spec = self.method.potential
        generators = self._row_generators("siblings", step, path.x_from.shape[1])
        log_w, log_ratio = sibling_log_weights(
            path,
            self.reference,
            self.proposal,
            self.reward,
            alpha,
            get_twist_schedule(spec.schedule),
            hp.num_steps,
            hp.siblings,
            hp.twist_samples,
            generators,
            self.q.mask_id,
            self.network_cond(cond),
        )
        J = log_w.shape[-1]
        spread = ((log_w - log_w.detach().mean(-1, keepdim=True)) ** 2).sum(-1) / (J - 1)
        recorded = log_w[..., 0].detach()
        offset = self._f_psi(path, cond)
        loss = spread.mean() + log_variance_loss(recorded, offset)
        out = {
            "log_variance": log_variance_loss(recorded, offset).detach(),
            "log_w_var": recorded.var(dim=1).mean(),
            "sibling_var": spread.detach().mean(),
        }
        if path.x_from.shape[0] == hp.num_steps:
            out.update(_rollout_diagnostics(path, log_ratio, hp))
        out["loss"] = loss
        return out

    def paired_twist_change(
        self,
        path: SMCPath,
        step: int,
        cond: Tensor | None = None,
        alpha: float | None = None,
    ) -> Tensor:
        """``log gamma_s - log gamma_t`` of every transition of ``path`` with common random
        numbers (``log_variance.paired_twist_change``); row ``r``'s uniforms are seeded by
        ``(seed, step, global row index)``, so every world size draws the same. The twists'
        x0 draws come from the reference (CFG-combined with ``guidance``)."""
        hp = self.hparams
        spec = self.method.potential
        generators = self._row_generators("paired", step, path.x_from.shape[1])
        return paired_twist_change(
            path,
            self.reference,
            self.reward,
            self.alpha_at(step) if alpha is None else alpha,
            get_twist_schedule(spec.schedule),
            hp.num_steps,
            hp.twist_samples,
            generators,
            self.q.mask_id,
            self.network_cond(cond),
        )

    def _pick_transitions(self, path: SMCPath) -> SMCPath:
        """On-policy: ``transitions`` random steps of the fresh rollout. With a replay buffer the
        rollout joins the buffer and each row slot takes its row from one buffered rollout drawn
        uniformly. The draws depend on the global step (and the slot's global index), never on
        the rank, so every world size picks the same transitions."""
        hp = self.hparams
        step = self.global_step
        cond = getattr(path, "cond", None)
        if hp.replay_size:
            self.replay.append(path.to("cpu"))
            self.replay_cond.append(None if cond is None else cond.cpu())
            del self.replay[: -hp.replay_size]
            del self.replay_cond[: -hp.replay_size]
            rank, _ = self._world()
            R = path.x_from.shape[1]
            source = torch.tensor(
                [
                    derive_seed(hp.seed, _STAGES["replay"], step, rank * R + r) % len(self.replay)
                    for r in range(R)
                ]
            )
            path = _replayed(self.replay, source).to(self.device)
            if cond is not None:
                picked = [self.replay_cond[s][r] for r, s in enumerate(source.tolist())]
                cond = torch.stack(picked).to(self.device)
        T = path.x_from.shape[0]
        if hp.transitions is not None and hp.transitions < T:
            g = torch.Generator().manual_seed(derive_seed(hp.seed, _STAGES["transitions"], step))
            steps = torch.randperm(T, generator=g)[: hp.transitions].sort().values
            path = path.select(steps.to(path.x_from.device))
        path.cond = cond
        return path

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        alpha = self.alpha_at(self.global_step)
        path = self.rollout("train", alpha=alpha)
        terms = {
            "rollout_reward": (alpha * path.twist_to[-1]).mean()
        }  # exact final twist r / alpha
        if self.hparams.reward_warmup_steps:
            terms["reward_weight"] = torch.tensor(1.0 / alpha)
        terms.update(self.loss_on(self._pick_transitions(path), alpha=alpha))
        for name, value in terms.items():
            self.log(
                f"train/{name}",
                value,
                prog_bar=name == "loss",
                batch_size=self.hparams.rollouts,
                sync_dist=True,
            )
        return terms["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        alpha = self.alpha_at(None)  # the target's own alpha
        path = self.rollout("val", step=batch_idx, alpha=alpha)  # the same seeds every time
        terms = self.loss_on(path, step=batch_idx, alpha=alpha)
        terms["rollout_reward"] = (self.method.potential.alpha * path.twist_to[-1]).mean()
        for name in ("log_variance", "log_w_var", "sibling_var", "rollout_reward", "is_ess"):
            if name in terms:
                self.log(
                    f"val/{name}", terms[name], batch_size=self.hparams.rollouts, sync_dist=True
                )

    # ------------------------------------------------------------------ loop plumbing
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.hparams.steps_per_epoch), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(1), batch_size=1)

    def configure_optimizers(self):
        adapter = self.q.adapter_parameters()
        if not adapter:
            raise ValueError("the LoRA adapter has no parameters; check target_modules")
        return torch.optim.AdamW(
            [
                {"params": adapter, "lr": self.hparams.lr},
                {
                    "params": list(self.f_psi.parameters()),
                    "lr": self.hparams.normalizer_lr,
                    "weight_decay": 0.0,
                },
            ],
            weight_decay=self.hparams.weight_decay,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The replay buffer of **all** ranks (rows in global order; every rank takes part, rank
        zero writes), so a resume restores each rank's rows, for any world size."""
        checkpoint["replay"] = [vars(_gather_rows(p, self)) for p in self.replay]
        checkpoint["replay_cond"] = [_gather_cond(c, self) for c in self.replay_cond]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rank, world = self._world()
        self.replay = [_shard_rows(SMCPath(**p), rank, world) for p in checkpoint.get("replay", [])]
        conds = checkpoint.get("replay_cond", [None] * len(self.replay))
        self.replay_cond = [None if c is None else c.chunk(world)[rank] for c in conds]

    def on_fit_end(self) -> None:
        # not after fast_dev_run, nor after a fit with no optimizer step (an untrained adapter)
        if self.trainer.is_global_zero and not self.trainer.fast_dev_run and self.global_step:
            root = self.hparams.export_dir or Path(self.trainer.default_root_dir) / "adapter"
            self.save_adapter(root)

    def save_adapter(self, directory: str | Path) -> Path:
        """The adapter (peft format) and ``F_psi`` (``f_psi.safetensors``) in ``directory``."""
        from safetensors.torch import save_file

        directory = self.q.save_adapter(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.f_psi.state_dict().items()}
        save_file(state, str(Path(directory) / "f_psi.safetensors"))
        hp = self.hparams
        record = {  # how q_phi was trained: load it with the same guidance and F_psi kind
            "guidance": hp.guidance,
            "null_class": hp.null_class,
            "classes": hp.classes,
            "prompts": hp.prompts,
            "log_normalizer": hp.log_normalizer,
            "num_steps": hp.num_steps,
            "alpha": self.method.potential.alpha,
        }
        (Path(directory) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return Path(directory)


def _rollout_diagnostics(path: SMCPath, log_ratio: Tensor, hp: Any) -> dict:
    """For a path holding every transition of its rollouts: ``is_ess``, the effective sample
    size / R of the rollouts as importance samples of the tilted target, from their path weights
    ``r(x) / alpha + sum_k [log p - log q]`` (``log_ratio [K, R]``: the transitions'
    ``log p - log q`` sums; the twists telescope to the exact final twist).
    1 for the optimal proposal; it should rise as ``q_phi`` learns. (Only with on-policy
    rollouts: with replay, the rows are other proposals' samples.)"""
    if hp.replay_size:
        return {}
    path_log_w = path.twist_to[-1] + log_ratio.sum(0)
    return {"is_ess": ess(path_log_w.double()).to(torch.float32) / path_log_w.shape[0]}


def _replayed(buffer: list[SMCPath], source: Tensor) -> SMCPath:
    """Row ``r`` of the result is row ``r`` of rollout ``buffer[source[r]]`` (same plan); only
    those rows are copied."""
    rows = list(enumerate(source.tolist()))
    picked = {
        f: torch.stack([getattr(buffer[s], f)[:, r] for r, s in rows], dim=1) for f in _ROW_FIELDS
    }
    return SMCPath(t=buffer[0].t, step=buffer[0].step, **picked)


_ROW_FIELDS = ("x_from", "x_to", "twist_from", "twist_to")


def _gather_rows(path: SMCPath, module: AmortizedProposalModule) -> SMCPath:
    """The rows of every rank side by side ``[T, W * R, ...]`` (this rank's path alone if
    the module runs in one process)."""
    if module._world()[1] == 1:
        return path
    rows = {}
    for f in _ROW_FIELDS:
        value = module.all_gather(getattr(path, f).to(module.device)).cpu()  # [W, T, R, ...]
        rows[f] = value.transpose(0, 1).flatten(1, 2)
    return SMCPath(t=path.t, step=path.step, **rows)


def _gather_cond(cond: Tensor | None, module: AmortizedProposalModule) -> Tensor | None:
    """The rows' labels of every rank in global order ``[W * R]`` (as ``_gather_rows``)."""
    if cond is None or module._world()[1] == 1:
        return cond
    return module.all_gather(cond.to(module.device)).cpu().flatten()


def _num_classes(denoiser: Any) -> int | None:
    """The number of classes of a class-conditional denoiser (``num_classes`` or its
    transformer's config), else ``None``."""
    found = getattr(denoiser, "num_classes", None)
    if found is None:
        config = getattr(getattr(denoiser, "transformer", None), "config", None)
        found = getattr(config, "num_classes", None)
    return None if found is None else int(found)


def _shard_rows(path: SMCPath, rank: int, world: int) -> SMCPath:
    """This rank's rows of a globally ordered path."""
    total = path.x_from.shape[1]
    if total % world:
        raise ValueError(
            f"the checkpoint's replay buffer holds rollouts of {total} rows, which {world} ranks "
            "cannot share equally; resume with a world size that divides it"
        )
    size = total // world
    rows = slice(rank * size, (rank + 1) * size)
    return SMCPath(t=path.t, step=path.step, **{f: getattr(path, f)[:, rows] for f in _ROW_FIELDS})
