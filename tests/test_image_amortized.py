"""SMCamot on the image backbone (issue 15, part 3): the LoRA proposal on a class-conditional
Meissonic, CFG inside the rollouts (``guidance``), ``F_psi(t, c)``, exact resume, export.

The exact-target test enumerates a toy conditional denoiser (``V = 3``, ``L = 4``, 81 states):
the CFG sampler's own distribution ``p_CFG(x0 | c)`` is computed by summing over the 24 unmasking
orders of ``random`` unmasking (one uniformly chosen position per step), from the joints directly
(not through ``GuidedDenoiser``), and tilted by ``exp(r / alpha)``."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from exact import L as LEN
from exact import V, enumerate_states, estimate, max_z_score, toy_joint, z_of_normalizer
from torch import nn

import lightning_smc as ls
from lightning_smc.methods import RewardTiltSpec
from lightning_smc.models import LoRADenoiser
from lightning_smc.models.lora import GuidedDenoiser
from lightning_smc.models.meissonic import MeissonicClassTransformer, MeissonicDenoiser
from lightning_smc.modules.amortized import AmortizedProposalModule
from lightning_smc.modules.log_variance import LogNormalizer

ALPHA, W = 0.5, 2.0
Z_MAX = 4.5
CLASSES, CODES = 4, 32
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def reward_fn(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


# ---------------------------------------------------------------------------- toy conditional
class ToyConditional(nn.Module):
    """Exact conditionals of three joints (class 0, class 1, null = 2) plus a linear head of
    the one-hot state, zero here (so the base is exact); LoRA adapts the head."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        # (a fourth, unused joint: ExactDenoiser reads [3, 3, 3, 3, 3] as one joint of length 5)
        joints = [toy_joint(11), toy_joint(12), toy_joint(13, sharpness=1.0), toy_joint(14)]
        self.joints = torch.stack(joints)
        self.exact = ls.ExactDenoiser(self.joints)
        self.vocab_size, self.mask_id = V + 1, V
        self.head = nn.Linear(LEN * (V + 1), LEN * V)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_t, t, cond=None):
        labels = torch.full((x_t.shape[0],), 2) if cond is None else cond.long()
        exact = self.exact(x_t, t, labels).float()
        onehot = nn.functional.one_hot(x_t, V + 1).float().flatten(1)
        shift = self.head(onehot).view(-1, LEN, V)
        return torch.cat([exact[..., :V] + shift, exact[..., V:]], -1)


def conditional_table(joint, revealed):
    """``p(x_i = v | revealed)`` ``[L, V]`` of a joint ``[V] * L`` (``revealed``: {pos: value})."""
    states = enumerate_states()
    keep = torch.ones(len(states), dtype=torch.bool)
    for i, v in revealed.items():
        keep &= states[:, i] == v
    mass = joint.flatten() * keep
    table = torch.stack(
        [torch.stack([mass[states[:, i] == v].sum() for v in range(V)]) for i in range(LEN)]
    )
    return table / table.sum(-1, keepdim=True)


def cfg_sampler_distribution(cond_joint, null_joint, w):
    """``p_CFG(x0)`` over the 81 states: uniform orders, each position drawn from
    ``p(.|c)^w p(.|null)^(1 - w)`` normalized, given the positions revealed so far."""
    states = enumerate_states()
    probs = torch.zeros(len(states), dtype=torch.float64)
    orders = list(itertools.permutations(range(LEN)))
    for s, x in enumerate(states.tolist()):
        total = 0.0
        for order in orders:
            p, revealed = 1.0, {}
            for i in order:
                mixed = conditional_table(cond_joint, revealed)[i] ** w
                mixed = mixed * conditional_table(null_joint, revealed)[i] ** (1 - w)
                p *= float(mixed[x[i]] / mixed.sum())
                revealed[i] = x[i]
            total += p
        probs[s] = total / len(orders)
    return probs


def perturb(lora, std=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def toy_module(**kwargs):
    args = dict(
        potential=RewardTiltSpec(alpha=ALPHA, schedule="linear", num_samples=1),
        seq_len=LEN,
        num_steps=LEN,
        unmasking="random",
        rollouts=8,
        target_modules=["head"],
        lora_rank=2,
        lora_alpha=2.0,
        guidance=W,
        null_class=2,
        classes=[1],
    )
    return AmortizedProposalModule(ToyConditional(), reward_fn, **{**args, **kwargs})


def test_cfg_lora_proposal_hits_the_tilted_cfg_sampler_distribution():
    """Rollouts of the shared sampler with a (perturbed) LoRA q_phi under CFG weight w = 2
    target p_CFG(x0 | c) exp(r / alpha); E[Z_hat] = sum of that. Breaking the weight (no
    log p - log q correction) or dropping the guidance from the reference is rejected."""
    B, N = 2000, 8
    torch.manual_seed(0)  # lora_A's initialisation (lora_B is set by perturb)
    module = toy_module(rollout_particles=N)
    perturb(module.q)
    joints = module.q.peft.get_base_model().joints
    p_cfg = cfg_sampler_distribution(joints[1], joints[2], W)
    assert abs(float(p_cfg.sum()) - 1.0) < 1e-9
    target = p_cfg * torch.exp(reward_fn(enumerate_states()) / ALPHA)
    cond = torch.ones(B, dtype=torch.long)

    def draw(sampler, seed=0):
        return sampler.sample(
            LEN, batch_size=B, cond=cond, generator=torch.Generator().manual_seed(seed)
        )

    out = draw(module.rollout_sampler())
    pi_hat, se = estimate(out)
    assert max_z_score(pi_hat, se, target, B * N) < Z_MAX
    assert z_of_normalizer(out, float(target.sum())) < Z_MAX
    # the proposal differs from the reference: the test would see a missing correction
    unguided = joints[1].flatten() * torch.exp(reward_fn(enumerate_states()) / ALPHA)
    assert max_z_score(pi_hat, se, unguided, B * N) > 2 * Z_MAX
    broken = ls.SMCSampler(
        module.reference,
        num_particles=N,
        num_steps=LEN,
        unmasking="random",
        potential=ls.RewardTilt(reward_fn, alpha=ALPHA),
        proposal=ls.DenoiserProposal(module.proposal, correct=False),
    )
    pi_bad, se_bad = estimate(draw(broken, seed=1))
    # the broken weights fail the acceptance criterion above, with a margin (measured 7.8)
    assert max_z_score(pi_bad, se_bad, target, B * N) > 1.5 * Z_MAX


def test_guided_denoiser_is_the_normalized_cfg_kernel():
    toy = ToyConditional()
    x = torch.tensor([[V, 0, V, 2], [V, V, V, V]])
    t = torch.ones(2)
    guided = GuidedDenoiser(toy, W, null_cond=2)(x, t, torch.tensor([1, 0]))
    lp_c = torch.log_softmax(toy(x, t, torch.tensor([1, 0])), -1)
    lp_u = torch.log_softmax(toy(x, t, torch.tensor([2, 2])), -1)
    masked = x == V  # (a clean position keeps its token: probability one there)
    expected = torch.log_softmax(W * lp_c[..., :V] + (1 - W) * lp_u[..., :V], -1)
    torch.testing.assert_close(guided[..., :V][masked], expected[masked])
    clean = guided[..., :V][~masked]
    assert torch.equal(clean.exp(), nn.functional.one_hot(x[~masked], V).float())
    assert torch.isneginf(guided[..., V]).all()
    assert torch.equal(GuidedDenoiser(toy, 1.0)(x, t, torch.tensor([1, 0])), lp_c)
    with pytest.raises(ValueError, match="guidance weight"):
        GuidedDenoiser(toy, 0.0)


# ---------------------------------------------------------------------------- tiny Meissonic
def tiny_meissonic(seed=0):
    torch.manual_seed(seed)
    transformer = MeissonicClassTransformer(
        num_classes=CLASSES,
        num_class_tokens=2,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
        vocab_size=CODES + 1,
        codebook_size=CODES,
    )
    return MeissonicDenoiser(transformer, (3, 3)).eval()


def grid_reward(x):
    """A cheap token reward on 3 x 3 grids: the share of codes below 8."""
    return (x < 8).double().mean(-1)


def grid_inputs(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CODES, (batch, 9), generator=g)
    x[torch.rand(batch, 9, generator=g) < 0.5] = CODES
    return x, torch.rand(batch, generator=g), torch.tensor([0, 1, 2, CLASSES])[:batch]


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_zero_adapter_and_disabled_adapter_give_the_base_logits(init):
    base = tiny_meissonic()
    x, t, c = grid_inputs()
    reference = base(x, t, c)
    lora = LoRADenoiser(base, rank=4, alpha=4.0, target_modules=ATTENTION, init=init)
    names = [n for n, _ in lora.peft.named_parameters() if "lora_A" in n]
    assert any("to_out.0" in n for n in names) and any("to_q" in n for n in names)
    # q_phi and p_theta as the module evaluates them (both through peft): bitwise equal, so
    # every log p - log q of a zero adapter is exactly 0
    assert torch.equal(lora(x, t, c), lora.base_denoiser(x, t, c))
    # against the unwrapped network: equal up to float32 rounding (peft's wrapped Linear layers
    # take another kernel path inside the attention; measured 2.4e-7)
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(lora(x, t, c), reference, **close)
    perturb(lora)
    torch.testing.assert_close(lora.base_denoiser(x, t, c), reference, **close)
    assert (lora(x, t, c) - reference)[torch.isfinite(reference)].abs().max() > 1e-2
    # under guidance, the guided q with a zero adapter is the guided reference, exactly
    zero = LoRADenoiser(tiny_meissonic(), rank=4, alpha=4.0, target_modules=ATTENTION)
    g_q, g_p = GuidedDenoiser(zero, 3.0, CLASSES), GuidedDenoiser(zero.base_denoiser, 3.0, CLASSES)
    assert torch.equal(g_q(x, t, c), g_p(x, t, c))


def test_f_psi_depends_on_the_class():
    f = LogNormalizer(4, "mlp_cond", num_classes=CLASSES)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    step, t = torch.arange(4), torch.linspace(1, 0.25, 4)
    values = f(step, t, torch.tensor([0, 1, CLASSES]))
    assert values.shape == (4, 3)
    assert (values[:, 0] - values[:, 1]).abs().max() > 1e-3
    assert torch.equal(f(step, t, None)[:, 0], values[:, 2])  # None: the unconditional row
    with pytest.raises(ValueError, match="class labels must lie"):
        f(step, t, torch.tensor([CLASSES + 1]))
    with pytest.raises(ValueError, match="num_classes"):
        LogNormalizer(4, "mlp_cond")


def image_module(**kwargs):
    args = dict(
        potential=RewardTiltSpec(alpha=0.25, schedule="linear", num_samples=0),
        seq_len=9,
        num_steps=4,
        rollouts=4,
        transitions=None,
        lora_rank=4,
        lora_alpha=4.0,
        target_modules=ATTENTION,
        lora_init="gaussian",
        log_normalizer="mlp_cond",
        classes=[0, 1, 2, 3],
        guidance=2.0,
        null_class=CLASSES,
        twist_estimate="paired",
        twist_samples=0,
        baseline="per_state",
        siblings=2,
        lr=3e-3,
        weight_decay=1e-4,
        reward_warmup_steps=2,
        replay_size=2,
    )
    return AmortizedProposalModule(tiny_meissonic(), grid_reward, **{**args, **kwargs})


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        **kwargs,
    )


def test_image_training_resumes_exactly_and_exports_a_loadable_adapter(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps, ckpt=None, every=None):
        module = image_module()
        callbacks = []
        if every:
            callbacks.append(
                ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
            )
        trainer(
            tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every)
        ).fit(module, ckpt_path=ckpt)
        return module

    straight = fit(3)
    assert float(straight.q.adapter_parameters()[-1].detach().abs().sum()) > 0  # the adapter moved
    fit(1, every=1)
    (ckpt,) = (tmp_path / "ckpt").glob("*step=1*.ckpt")
    resumed = fit(3, ckpt=str(ckpt))
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert len(resumed.replay) == len(resumed.replay_cond) == 2
    assert all(c.shape == (4,) for c in resumed.replay_cond)
    # the rows' labels follow the global rollout index: steps 0..2 of 4 rollouts over 4 classes
    assert resumed.rollout_labels(step=1).tolist() == [0, 1, 2, 3]
    # export: peft files, F_psi, base fingerprint, the training record; reload as a proposal
    folder = tmp_path / "adapter"
    record = json.loads((folder / "lsmc_amortized.json").read_text())
    assert record["guidance"] == 2.0 and record["null_class"] == CLASSES
    meta = json.loads((folder / "lsmc_adapter.json").read_text())
    assert meta["base_class"] == "MeissonicDenoiser"
    proposal = ls.DenoiserProposal.from_adapter(tiny_meissonic(), folder)
    x, t, c = grid_inputs()
    torch.testing.assert_close(proposal.denoiser(x, t, c), resumed.q(x, t, c))
    with pytest.raises(ValueError, match="different base model"):
        ls.DenoiserProposal.from_adapter(tiny_meissonic(seed=5), folder)
    # a method config's DenoiserProposalSpec proposes as the adapter was trained: with CFG 2
    from lightning_smc.methods import DenoiserProposalSpec

    spec = DenoiserProposalSpec(adapter=str(folder))
    built = spec.build(denoiser=tiny_meissonic(), reward=None, guide=None, amortized=None)
    assert isinstance(built.denoiser, GuidedDenoiser) and built.denoiser.weight == 2.0
    torch.testing.assert_close(built.denoiser(x, t, c), resumed.proposal(x, t, c))


def test_ranks_draw_the_rollout_labels_of_one_process_with_the_global_batch():
    """W ranks with R rollouts each condition on the labels one process with W * R draws (the
    DDP contract of the module docstring), at every step."""
    single = image_module(rollouts=4, classes=[0, 1, 2, 3, 4])
    ranks = [image_module(rollouts=2, classes=[0, 1, 2, 3, 4]) for _ in range(2)]
    for r, module in enumerate(ranks):
        module._world = lambda r=r: (r, 2)
    for step in range(3):
        joint = torch.cat([m.rollout_labels(step) for m in ranks])
        assert torch.equal(joint, single.rollout_labels(step))


def test_reward_warmup_anneals_the_reward_weight():
    module = image_module(reward_warmup_steps=4)
    alpha = module.method.potential.alpha
    assert [module.alpha_at(k) for k in range(5)] == pytest.approx(
        [alpha * 4 / (k + 1) for k in range(4)] + [alpha]
    )
    assert module.alpha_at(None) == alpha
    # the rollout's final twist is r / alpha_k
    path = module.rollout("val", step=0, alpha=module.alpha_at(0))
    assert path.cond.tolist() == [0, 1, 2, 3]
    x0 = path.x_to[-1]
    torch.testing.assert_close(path.twist_to[-1], grid_reward(x0) / module.alpha_at(0))


def test_image_base_loads_by_name_and_bad_settings_are_named():
    module = AmortizedProposalModule(
        "random_tiny_image",
        grid_reward,
        seq_len=49,
        num_steps=2,
        rollouts=2,
        classes=[7],
        log_normalizer="mlp_cond",
        target_modules=ATTENTION,
    )
    assert isinstance(module.q.peft.get_base_model(), MeissonicDenoiser)
    assert module.f_psi.num_classes == 10
    assert math.isfinite(float(module.loss_on(module.rollout("val", step=0), step=0)["loss"]))
    with pytest.raises(ValueError, match="classes"):
        image_module(classes=[CLASSES + 1])
    with pytest.raises(ValueError, match="guidance"):
        image_module(guidance=-1.0)
    with pytest.raises(ValueError, match="mlp_cond"):
        AmortizedProposalModule(
            ls.TinyTransformerDenoiser(6, max_len=4),
            reward_fn,
            seq_len=4,
            num_steps=2,
            log_normalizer="mlp_cond",
        )
    with pytest.raises(ValueError, match="twist_estimate='paired'"):
        image_module(baseline="f_psi", twist_estimate="rollout")


def test_text_to_image_base_conditions_rollouts_on_prompts(tmp_path):
    """A tiny Meissonic pipeline folder (Hub layout): prompts are encoded once, rollout i is
    conditioned on prompt i mod P, F_psi embeds the prompt index, guidance uses the empty
    prompt (cond=None) as CFG's null branch; a training step runs."""
    from test_text_cond import tiny_pipeline

    tiny_pipeline(tmp_path / "pipe")
    module = AmortizedProposalModule(
        str(tmp_path / "pipe"),
        grid_reward,
        potential=RewardTiltSpec(alpha=0.5, num_samples=0),
        seq_len=49,
        num_steps=2,
        rollouts=3,
        transitions=None,
        target_modules=ATTENTION,
        log_normalizer="mlp_cond",
        prompts=["a cat", "dog"],
        guidance=3.0,
        resolution=28,
        local_files_only=True,
    )
    assert set(module.prompt_cond) == {"encoder_hidden_states", "pooled_projections", "micro_conds"}
    ids = module.rollout_labels(step=1)
    assert ids.tolist() == [1, 0, 1]  # (3 + i) mod 2
    cond = module.network_cond(ids)
    assert torch.equal(cond["pooled_projections"][0], module.prompt_cond["pooled_projections"][1])
    path = module.rollout("val", step=1)
    assert path.cond.tolist() == [1, 0, 1] and path.x_from.shape == (2, 3, 49)
    terms = module.loss_on(path, step=1)
    terms["loss"].backward()
    assert math.isfinite(float(terms["loss"]))
    assert module.f_psi.num_classes == 2
    with pytest.raises(ValueError, match="not both"):
        image_module(prompts=["a cat"])
    with pytest.raises(ValueError, match="text-to-image pipeline"):
        image_module(classes=None, prompts=["a cat"])


# ---------------------------------------------------------------------------- configs
ROOT = Path(__file__).resolve().parents[1]
STEERING = ["best_of_n", "smc_base", "smc_grad", "smc_amot", "prop_grad", "prop_amot"]


def zero_adapter(folder):
    """A zero-initialised adapter of the seeded random tiny image model (what the configs'
    ``adapter: embedded_image`` loads onto once it is trained), with its F_psi."""
    from lightning_smc.models.image import load_image_model

    lora = LoRADenoiser(load_image_model("random_tiny_image").denoiser, 4, 4.0, ATTENTION)
    return lora.save_adapter(folder)


@pytest.mark.parametrize("name", [*STEERING, "smc_base+remdm"])
def test_image_steering_method_configs_sample_with_reward_and_holdout(name, tmp_path):
    from lightning_smc.sample import main as sample_main

    stem, _, remdm = name.partition("+")
    config = ROOT / "configs" / "methods" / "images" / f"{stem}.yaml"
    out = tmp_path / "out"
    args = ["--config", str(config), "--out", str(out), "--num_samples", "2", "--prompt", "10"]
    args += ["--model", "random_tiny_image", "--method.num_steps", "2", "--batch_size", "2"]
    if remdm:
        args += ["--method.unmasking", "remdm", "--method.num_steps", "4"]
    if "amot" in stem:
        args += ["--method.proposal.init_args.adapter", str(zero_adapter(tmp_path / "adapter"))]
    (summary,) = sample_main(args).values()
    assert -10.0 <= summary["reward"] <= 0.0 and -10.0 <= summary["holdout"] <= 0.0
    particles = 1 if stem.startswith("prop") else 8
    files = np.load(out / "samples.npz")
    assert files["labels"].tolist() == [10, 10]
    assert files["log_weights"].shape == (2, particles)


def test_embedded_image_adapter_is_resolved_or_names_its_training_command():
    from lightning_smc.methods import DenoiserProposalSpec
    from lightning_smc.models.image import EMBEDDED_IMAGE_ADAPTER, load_image_model

    spec = DenoiserProposalSpec(adapter="embedded_image")
    model = load_image_model("embedded_image")
    if (EMBEDDED_IMAGE_ADAPTER / "adapter_config.json").is_file():
        proposal = spec.build(denoiser=model.denoiser, reward=None, guide=None, amortized=None)
        assert isinstance(proposal.denoiser, LoRADenoiser)
    else:
        with pytest.raises(FileNotFoundError, match="fmnist_class_tiny.yaml"):
            spec.build(denoiser=model.denoiser, reward=None, guide=None, amortized=None)


@pytest.mark.parametrize("name", ["monetico_imagereward", "meissonic_imagereward"])
def test_at_scale_config_runs_its_settings_on_a_tiny_pipeline(name, tmp_path, monkeypatch):
    """The at-scale config with only its hub pipeline and reward weights swapped for a tiny
    pipeline in the Hub layout and a weight-free reward (LoRA, guidance, F_psi(t, prompt),
    per-state loss, warmup, optimizer as configured); one optimizer step on CPU."""
    import yaml
    from test_text_cond import tiny_pipeline

    from lightning_smc.fit import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny_pipeline(tmp_path / "pipe")
    data = yaml.safe_load((ROOT / "configs" / "amortized" / f"{name}.yaml").read_text())
    model = data["model"]["init_args"]
    assert model["guidance"] == 5.0 and model["num_steps"] == 48 and model["lora_rank"] == 4
    model.update(base=str(tmp_path / "pipe"), resolution=28, seq_len=49, num_steps=4)
    model["reward"] = {
        "class_path": "lightning_smc.rewards.JpegCompressibility",
        "init_args": {"vq": str(tmp_path / "pipe" / "vqvae")},
    }
    model.update(rollouts=2, transitions=2, siblings=2, reward_warmup_steps=2)
    data["trainer"].update(accelerator="cpu", precision="32-true", logger=False)
    copy = tmp_path / f"{name}.yaml"
    copy.write_text(yaml.safe_dump(data))
    cli = main(["fit", "--config", str(copy), "--trainer.fast_dev_run", "1"])
    assert cli.trainer.global_step == 1
    assert cli.model.prompt_cond["pooled_projections"].shape[0] == len(model["prompts"])


# ---------------------------------------------------------------------------- DDP
def _image_ddp_config(tmp, name, devices=2, rollouts=2, steps=2):
    import yaml

    root = tmp / name
    dump = {"class_path": "ddp_probe.ParamDump", "init_args": {"directory": str(root / "params")}}
    trainer = {
        "accelerator": "cpu",
        "devices": devices,
        "strategy": "ddp" if devices > 1 else "auto",
        "max_steps": steps,
        "logger": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "callbacks": [dump],
    }
    model = {
        "class_path": "lightning_smc.modules.AmortizedProposalModule",
        "init_args": {
            "base": "random_tiny_image",
            "reward": {
                "class_path": "lightning_smc.rewards.JpegCompressibility",
                "init_args": {"vq": "random_tiny_image"},
            },
            "potential": {"alpha": 1.0, "schedule": "linear", "num_samples": 1},
            "seq_len": 49,
            "num_steps": 2,
            "schedule": "maskgit_cosine",
            "rollouts": rollouts,
            "transitions": 1,
            "replay_size": 2,
            "twist_estimate": "paired",
            "twist_samples": 0,
            "classes": [0, 3, 5, 7, 10],
            "log_normalizer": "mlp_cond",
            "guidance": 1.5,
            "null_class": 10,
            "target_modules": ATTENTION,
            "lr": 1.0e-2,
            "steps_per_epoch": 100,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": trainer, "model": model}))
    return path, root


@pytest.mark.slow
def test_image_ddp_matches_one_process_and_resumes_exactly(tmp_path):
    """2 gloo processes with 2 rollouts each = 1 process with 4 (the same labels, rollouts and
    transitions; losses to float rounding); a 2-process resume from step 1 equals 2 straight
    steps bit for bit, the replay buffer's rows and their labels included."""
    from test_distributed_fit import _fit, _max_diff, _ok, _params

    config, two = _image_ddp_config(tmp_path, "two")
    _ok(_fit(config))
    a0, a1 = _params(two, 2)
    assert a0["step"] == 2 and _max_diff(a0["params"], a1["params"]) == 0.0
    ckpt = torch.load(two / "checkpoints" / "last.ckpt", weights_only=False)
    assert [c.tolist() for c in ckpt["replay_cond"]] == [[0, 3, 5, 7], [10, 0, 3, 5]]
    config, one = _image_ddp_config(tmp_path, "one", devices=1, rollouts=4)
    _ok(_fit(config))
    (b,) = _params(one, 1)
    torch.testing.assert_close(
        torch.tensor(a0["losses"]), torch.tensor(b["losses"]), rtol=1e-4, atol=1e-6
    )
    config, half = _image_ddp_config(tmp_path, "half", steps=1)
    _ok(_fit(config))
    config, resumed = _image_ddp_config(tmp_path, "resumed")
    _ok(_fit(config, "--ckpt_path", str(half / "checkpoints" / "last.ckpt")))
    c0, _ = _params(resumed, 2)
    assert c0["step"] == 2 and _max_diff(a0["params"], c0["params"]) == 0.0
