"""SMCamot: the LoRA proposal, ``F_psi`` and the log-variance training module (issue 4)."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from exact import L as LEN
from exact import enumerate_states, estimate, max_z_score, toy_joint, z_of_normalizer

import lightning_smc as ls
from lightning_smc.methods import RewardTiltSpec
from lightning_smc.models import LoRADenoiser, MDLMDenoiser
from lightning_smc.modules.amortized import (
    AmortizedProposalModule,
    log_variance_loss,
    transition_log_weights,
)

ALPHA = 0.5


def reward_fn(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


def small_mdlm(seed=0):
    torch.manual_seed(seed)
    model = MDLMDenoiser(
        vocab_size=20, model_length=8, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=2
    ).eval()
    with torch.no_grad():  # MDLM zero-initialises its output and adaLN layers: randomise all
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def perturb(lora: LoRADenoiser, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(seed=0, vocab=20, length=8, batch=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab - 1, (batch, length), generator=g)
    x[torch.rand(batch, length, generator=g) < 0.5] = vocab - 1
    return x, torch.rand(batch, generator=g)


# ---------------------------------------------------------------------------- LoRA invariants
def test_zero_initialised_adapter_gives_exactly_the_base_logits():
    base = small_mdlm()
    x, t = inputs()
    reference = base(x, t)
    lora = LoRADenoiser(base, rank=4)
    assert torch.equal(lora(x, t), reference)
    assert torch.equal(lora.base_denoiser(x, t), reference)


def test_disabled_adapter_gives_the_base_logits_and_enabled_differs():
    base = small_mdlm()
    x, t = inputs()
    reference = base(x, t)
    lora = LoRADenoiser(base, rank=4)
    perturb(lora)
    assert torch.equal(lora.base_denoiser(x, t), reference)
    assert not torch.allclose(lora(x, t), reference)


def test_only_adapter_and_f_psi_receive_gradients():
    module = AmortizedProposalModule(
        small_mdlm(),
        reward_fn,
        potential=RewardTiltSpec(alpha=ALPHA),
        seq_len=8,
        num_steps=4,
        rollouts=4,
        lora_rank=2,
    )
    perturb(module.q)
    module.loss_on(module.rollout())["loss"].backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all("lora_" in n or n.startswith("f_psi.") for n in trainable)
    assert any(n.startswith("f_psi.") for n in with_grad)
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)


def test_saved_adapter_reloads_to_identical_logits(tmp_path):
    lora = LoRADenoiser(small_mdlm(), rank=4)
    perturb(lora)
    lora.save_adapter(tmp_path / "adapter")
    x, t = inputs(1)
    reloaded = LoRADenoiser.from_adapter(small_mdlm(), tmp_path / "adapter")
    assert torch.equal(reloaded(x, t), lora(x, t))
    assert torch.equal(reloaded.base_denoiser(x, t), small_mdlm()(x, t))


def test_adapter_for_another_base_or_vocabulary_is_refused(tmp_path):
    lora = LoRADenoiser(small_mdlm(), rank=4)
    lora.save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="different base model"):
        LoRADenoiser.from_adapter(small_mdlm(seed=5), tmp_path / "adapter")
    other_vocab = MDLMDenoiser(
        vocab_size=30, model_length=8, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=2
    )
    with pytest.raises(ValueError, match="vocab_size=20"):
        LoRADenoiser.from_adapter(other_vocab, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoRADenoiser.from_adapter(small_mdlm(), tmp_path)
    with pytest.raises(ValueError, match="target_modules"):
        LoRADenoiser(small_mdlm(), target_modules=["no_such_layer"])


# ---------------------------------------------------------------------------- exact toy
class ExactTwist(ls.Potential):
    """The consistent twist ``gamma_t(x_t) = E_p0[exp(r / alpha) | x_t]`` by enumeration."""

    def __init__(self, p0):
        self.states = enumerate_states()
        self.joint = p0.flatten()
        self.tilt = torch.exp(reward_fn(self.states) / ALPHA)

    def twist(self, ctx, base_log_probs):
        x = ctx.x_t
        consistent = ((x.unsqueeze(1) == ctx.mask_id) | (x.unsqueeze(1) == self.states)).all(-1)
        mass = consistent * self.joint
        return torch.log((mass * self.tilt).sum(-1) / mass.sum(-1))

    def final_twist(self, x0):
        return reward_fn(x0) / ALPHA


def toy_paths(p0, proposal, batch=256, seed=0):
    sampler = ls.SMCSampler(
        ls.ExactDenoiser(p0),
        num_particles=1,
        num_steps=LEN,
        unmasking="random",
        potential=ExactTwist(p0),
        proposal=ls.DenoiserProposal(proposal),
    )
    return sampler.sample(
        seq_len=LEN,
        batch_size=batch,
        generator=torch.Generator().manual_seed(seed),
        record_path=True,
    )


def test_log_variance_loss_is_zero_for_the_optimal_proposal():
    p0 = toy_joint(12)
    base = ls.ExactDenoiser(p0)
    optimal = ls.ExactDenoiser(p0 * torch.exp(reward_fn(enumerate_states()) / ALPHA).view(p0.shape))
    out = toy_paths(p0, optimal)
    log_w, _ = transition_log_weights(out.path, base, optimal, base.mask_id)
    assert log_w.abs().max() < 1e-9
    assert float(log_variance_loss(log_w, torch.zeros(LEN, 1))) < 1e-18
    # the same loss is far from zero for the base proposal (the test has power)
    out = toy_paths(p0, base)
    log_w, _ = transition_log_weights(out.path, base, base, base.mask_id)
    assert float(log_w.var(dim=1).mean()) > 0.05


def test_transition_log_weights_add_up_to_the_samplers_log_normalizer():
    """With one particle, log Ẑ = initial twist + the sum of the transitions' log-weights."""
    p0, q0 = toy_joint(13), toy_joint(14, sharpness=1.0)
    base, proposal = ls.ExactDenoiser(p0), ls.ExactDenoiser(q0)
    out = toy_paths(p0, proposal)
    log_w, _ = transition_log_weights(out.path, base, proposal, base.mask_id)
    total = out.path.twist_from[0] + log_w.sum(0)
    torch.testing.assert_close(total, out.log_normalizer, rtol=0, atol=1e-9)


def test_perturbed_lora_proposal_hits_the_exact_tilted_target():
    p0 = toy_joint(15)
    torch.manual_seed(0)
    q = LoRADenoiser(ls.TinyTransformerDenoiser(4, max_len=LEN, d_model=16, n_layers=1), rank=2)
    perturb(q, std=0.5)
    sampler = ls.SMCSampler(
        ls.ExactDenoiser(p0),
        num_particles=8,
        num_steps=LEN,
        unmasking="random",
        potential=ls.RewardTilt(reward_fn, alpha=ALPHA, schedule="linear"),
        proposal=ls.DenoiserProposal(q),
    )
    out = sampler.sample(seq_len=LEN, batch_size=3000, generator=torch.Generator().manual_seed(0))
    target = p0.flatten() * torch.exp(reward_fn(enumerate_states()) / ALPHA)
    pi_hat, se = estimate(out)
    n = 3000 * 8
    assert max_z_score(pi_hat, se, target, n) < 4.5
    assert max_z_score(pi_hat, se, p0.flatten(), n) > 9.0
    assert z_of_normalizer(out, float(target.sum())) < 4.5


# ---------------------------------------------------------------------------- training
def toy_module(**overrides):
    torch.manual_seed(0)
    base = ls.TinyTransformerDenoiser(6, max_len=6, d_model=32, n_layers=1)
    kwargs = dict(
        potential=RewardTiltSpec(alpha=ALPHA, num_samples=0),
        seq_len=6,
        num_steps=6,
        rollouts=16,
        transitions=None,
        lora_rank=4,
        lr=3e-2,
        normalizer_lr=5e-2,
        steps_per_epoch=30,
        seed=3,
    )
    kwargs.update(overrides)
    return AmortizedProposalModule(base, lambda x: (x == 2).double().sum(-1), **kwargs)


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        **kwargs,
    )


def squared_errors(module, rollouts=256):
    """Per-transition ``(log w - F)^2`` on fresh rollouts (fixed seed), as a flat sample."""
    module.hparams.rollouts = rollouts
    with torch.no_grad():
        path = module.rollout("val", step=7)
        log_w, _ = transition_log_weights(path, module.q.base_denoiser, module.q, module.q.mask_id)
        offset = module.f_psi(path.step, path.t).unsqueeze(1).double()
    module.hparams.rollouts = 16
    return ((log_w - offset) ** 2).flatten()


def test_training_drives_the_log_weight_variance_down(tmp_path):
    module = toy_module()
    before = squared_errors(module)
    trainer(tmp_path, max_steps=40, enable_checkpointing=False).fit(module)
    after = squared_errors(module)
    # the decrease must exceed 4 standard errors of the difference of the two sample means
    se = math.sqrt(before.var() / before.numel() + after.var() / after.numel())
    assert float(before.mean() - after.mean()) > 4 * se, (float(before.mean()), float(after.mean()))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "f_psi.safetensors").is_file()


@pytest.mark.parametrize("replay_size", [0, 3], ids=["on-policy", "replay"])
def test_training_resumes_exactly(tmp_path, replay_size):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps, ckpt=None, every=None):
        module = toy_module(replay_size=replay_size, transitions=3)
        callbacks = []
        if every:
            callbacks.append(
                ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
            )
        trainer(
            tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every)
        ).fit(module, ckpt_path=ckpt)
        return module

    straight = fit(4)
    fit(2, every=2)
    (ckpt,) = (tmp_path / "ckpt").glob("*step=2*.ckpt")
    resumed = fit(4, ckpt=str(ckpt))
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    if replay_size:
        assert len(resumed.replay) == 3


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        toy_module(potential=RewardTiltSpec(alpha=0.0))
    with pytest.raises(ValueError, match="needs reward"):
        AmortizedProposalModule(ls.TinyTransformerDenoiser(6, max_len=6), None)
    with pytest.raises(ValueError, match="F_psi kind"):
        toy_module(log_normalizer="table")
    module = toy_module()
    module.reward = lambda x: torch.full((x.shape[0],), float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        module.rollout()
    module.reward = lambda x: torch.zeros(x.shape[0], 2)
    with pytest.raises(ValueError, match="one score per sequence"):
        module.rollout()


def test_reward_evaluation_logs_tables_and_images_to_wandb(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_smc.callbacks import RewardEvaluation
    from lightning_smc.methods import DenoiserProposalSpec, Method, RewardTiltSpec

    monkeypatch.setenv("WANDB_MODE", "offline")
    module = toy_module(steps_per_epoch=2)
    evaluation = RewardEvaluation(
        [
            Method(
                name="SMCbase", num_particles=2, num_steps=6, potential=RewardTiltSpec(alpha=ALPHA)
            ),
            Method(
                name="SMCamot",
                num_particles=2,
                num_steps=6,
                potential=RewardTiltSpec(alpha=ALPHA),
                proposal=DenoiserProposalSpec(),
            ),
        ],
        num_prompts=3,
    )
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[evaluation],
        max_steps=2,
        val_check_interval=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(module)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    import wandb

    wandb.teardown()  # leave no wandb service state behind for later runs in this process
    history = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
    for key in (b"eval/SMCbase/samples", b"eval/SMCamot/ess", b"eval/SMCamot/reward"):
        assert key in history, key
    media = {p.suffix for p in (run_dir / "files" / "media").rglob("*")}
    assert {".json", ".png"} <= media  # the tables and the ESS images
    assert (tmp_path / "eval.json").is_file() and len(evaluation.history) == 1


def test_replay_takes_each_slot_from_its_drawn_rollout():
    from lightning_smc.modules.amortized import _replayed
    from lightning_smc.sampling.output import SMCPath

    T, R, Lq = 3, 4, 5
    buffer = [
        SMCPath(
            torch.full((T, R, Lq), 10 * k) + torch.arange(R).view(1, R, 1),
            torch.full((T, R, Lq), 10 * k + 1) + torch.arange(R).view(1, R, 1),
            torch.linspace(1, 0.5, T),
            torch.arange(T),
            torch.full((T, R), float(k)),
            torch.full((T, R), float(k) + 0.5),
        )
        for k in range(3)
    ]
    source = torch.tensor([2, 0, 1, 2])
    out = _replayed(buffer, source)
    assert out.x_from.shape == (T, R, Lq) and out.twist_to.shape == (T, R)
    for r, k in enumerate(source.tolist()):
        assert torch.equal(out.x_from[:, r], buffer[k].x_from[:, r])
        assert torch.equal(out.x_to[:, r], buffer[k].x_to[:, r])
        assert torch.equal(out.twist_from[:, r], buffer[k].twist_from[:, r])
        assert torch.equal(out.twist_to[:, r], buffer[k].twist_to[:, r])
    assert torch.equal(out.step, buffer[0].step)


# ---------------------------------------------------------------------------- paired twist
def test_paired_twist_change_is_unbiased_and_exact_at_the_end():
    """``paired_twist_change`` couples the x0 draws of both states of a transition; each state's
    twist must keep its expectation: with one draw, ``E[log gamma(x)] = lambda E_p[r(x0)] /
    alpha`` with ``x0 ~ p_theta(x0 | x)`` factorized over the masked positions, computed here by
    enumerating the toy's completions (reward: the sum of the token ids, sensitive to any
    distortion of the draws). Over 16,000 seeds (rows) the mean change must be within 4 standard
    errors of it; drawing with skewed uniforms (``u ** 1.3``) fails. The last step's ``x_s`` is
    complete: its twist is exactly r / alpha."""
    import itertools

    from lightning_smc.modules.log_variance import paired_twist_change
    from lightning_smc.sampling.context import output_log_probs
    from lightning_smc.sampling.output import SMCPath

    module = toy_module(potential=RewardTiltSpec(alpha=ALPHA, num_samples=1))
    base, mask = module.q.base_denoiser, module.q.mask_id

    def reward(x):
        return x.double().sum(-1)

    path = module.rollout("val", step=0)
    T = path.x_from.shape[0]
    seeds = 16000
    for k in (2, T - 1):  # a middle step (both states partly masked) and the last
        row = int(((path.x_from[k] == mask).sum(-1) > 0).nonzero()[0])
        one = SMCPath(
            x_from=path.x_from[k : k + 1, row : row + 1].expand(1, seeds, -1),
            x_to=path.x_to[k : k + 1, row : row + 1].expand(1, seeds, -1),
            t=path.t[k : k + 1],
            step=path.step[k : k + 1],
            twist_from=path.twist_from[k : k + 1, :1].expand(1, seeds),
            twist_to=path.twist_to[k : k + 1, :1].expand(1, seeds),
        )
        generators = [torch.Generator().manual_seed(s) for s in range(seeds)]
        change = paired_twist_change(one, base, reward, ALPHA, lambda p: p, T, 1, generators, mask)

        def expected_twist(x, lam, t=one.t):
            lp = output_log_probs(base, base(x.unsqueeze(0), t, None))[0].double()
            masked = (x == mask).nonzero().flatten().tolist()
            total = 0.0
            for values in itertools.product(range(lp.shape[-1]), repeat=len(masked)):
                prob = math.prod(float(lp[i, v].exp()) for i, v in zip(masked, values, strict=True))
                x0 = x.clone()
                x0[masked] = torch.tensor(values, dtype=x.dtype)
                total += prob * float(reward(x0))
            return lam * total / ALPHA

        step = int(one.step[0])
        lam_s = 1.0 if step + 1 == T else (step + 1) / T
        truth = expected_twist(one.x_to[0, 0], lam_s) - expected_twist(one.x_from[0, 0], step / T)
        values = change[0]
        se = float(values.std() / math.sqrt(seeds))
        assert abs(float(values.mean()) - truth) < 4 * se, (float(values.mean()), truth, se)
        if step + 1 == T:  # x_s complete: exactly r / alpha, whatever the draws
            assert (one.x_to != mask).all()


def test_greedy_paired_twist_is_deterministic_and_training_runs(tmp_path):
    module = toy_module(twist_estimate="paired", twist_samples=0)
    path = module.rollout("val", step=0)
    a = module.paired_twist_change(path, step=0)
    b = module.paired_twist_change(path, step=5)  # other uniforms: unused by the greedy x0
    assert torch.equal(a, b)
    trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module)
    assert torch.isfinite(module.f_psi.values).all()
    with pytest.raises(ValueError, match="twist_estimate"):
        toy_module(twist_estimate="fresh")
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="twist_samples"):
            toy_module(twist_estimate="paired", twist_samples=bad)
    with pytest.raises(FileNotFoundError, match="no_such_adapter"):
        toy_module(init_adapter="no_such_adapter", lora_rank=8)


def toy_base():
    torch.manual_seed(0)  # the same weights as toy_module's base
    return ls.TinyTransformerDenoiser(6, max_len=6, d_model=32, n_layers=1)


def test_init_adapter_starts_from_a_saved_adapter(tmp_path):
    module = toy_module()
    perturb(module.q)
    with torch.no_grad():
        module.f_psi.values.copy_(torch.arange(6.0))
    module.save_adapter(tmp_path / "adapter")
    base = toy_base()
    resumed = AmortizedProposalModule(
        base,
        lambda x: (x == 2).double().sum(-1),
        potential=RewardTiltSpec(alpha=ALPHA),
        seq_len=6,
        num_steps=6,
        init_adapter=str(tmp_path / "adapter"),
    )
    x, t = inputs(vocab=6, length=6)
    assert torch.equal(resumed.q(x, t), module.q(x, t))
    assert torch.equal(resumed.f_psi.values, module.f_psi.values)
    assert resumed.q.adapter_parameters() and all(
        p.requires_grad for p in resumed.q.adapter_parameters()
    )
    with pytest.raises(ValueError, match="leave \\['lora_rank'\\]"):
        AmortizedProposalModule(
            toy_base(),
            lambda x: x.sum(-1).double(),
            seq_len=6,
            num_steps=6,
            lora_rank=4,
            init_adapter=str(tmp_path / "adapter"),
        )
    with pytest.raises(ValueError, match="does not fit num_steps=5"):
        AmortizedProposalModule(
            toy_base(),
            lambda x: x.sum(-1).double(),
            seq_len=6,
            num_steps=5,
            init_adapter=str(tmp_path / "adapter"),
        )


def test_rollout_importance_ess_uses_the_samplers_own_path_weights():
    """``is_ess`` (logged in training) is the ESS of the rollouts' path log-weights
    ``r / alpha + sum [log p - log q]``; each rollout is an SMC run with one particle, so its
    path log-weight is exactly the sampler's ``log Z-hat`` of that run. A perturbed adapter
    (q != p) makes them differ from row to row."""
    from lightning_smc.modules.amortized import _rollout_diagnostics
    from lightning_smc.smc import ess

    module = toy_module(potential=RewardTiltSpec(alpha=ALPHA, num_samples=1))
    perturb(module.q)
    with torch.no_grad():
        out = module.rollout_sampler().sample(
            6, generator=module._generators("val", 0), record_path=True
        )
        log_w, _ = transition_log_weights(out.path, module.q.base_denoiser, module.q, 5)
    recorded = out.path.twist_to - out.path.twist_from
    diag = _rollout_diagnostics(out.path, log_w - recorded, module.hparams)
    R = out.log_normalizer.shape[0]
    expected = ess(out.log_normalizer.double()) / R
    assert 0 < float(expected) < 0.99
    assert float(diag["is_ess"]) == pytest.approx(float(expected), rel=1e-5)


def test_batch_mean_baseline_gives_the_variance_gradient():
    """With ``baseline="batch_mean"`` the adapter's gradient is that of the per-step sample
    variance of log w (the batch mean detached), and F_psi's that of its own squared error."""
    module = toy_module(baseline="batch_mean")
    perturb(module.q)
    path = module.rollout("val", step=0)
    module.zero_grad()
    module.loss_on(path)["loss"].backward()
    got = [p.grad.clone() for p in module.q.adapter_parameters()]
    module.zero_grad()
    log_w, _ = transition_log_weights(path, module.q.base_denoiser, module.q, module.q.mask_id)
    ((log_w - log_w.mean(dim=1, keepdim=True)) ** 2).mean().backward()
    want = [p.grad for p in module.q.adapter_parameters()]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert any(float(a.abs().max()) > 0 for a in got)
    with pytest.raises(ValueError, match="baseline"):
        toy_module(baseline="mean")


class TableProposal(torch.nn.Module):
    """A proposal whose logits are one table ``theta [L, V]`` whatever the input."""

    def __init__(self, length, vocab, mask_id):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(length, vocab))
        self.mask_id = mask_id

    def forward(self, x, t, cond=None):
        return self.theta.expand(x.shape[0], -1, -1)


def one_committed_transition(module):
    """A recorded transition ``x_t -> x_s`` of the toy that commits exactly one position."""
    from lightning_smc.sampling.output import SMCPath

    path = module.rollout("val", step=0)
    mask = module.q.mask_id
    committed = (path.x_from == mask) & (path.x_to != mask)
    k, row = [int(v) for v in (committed.sum(-1) == 1).nonzero()[0]]
    step = slice(k, k + 1)
    return SMCPath(
        x_from=path.x_from[step, row : row + 1],
        x_to=path.x_to[step, row : row + 1],
        t=path.t[step],
        step=path.step[step],
        twist_from=path.twist_from[step, :1],
        twist_to=path.twist_to[step, :1],
    ), int(committed[k, row].nonzero())


def test_per_state_siblings_estimate_twice_the_kl_gradient_and_vanish_at_the_optimum():
    """``sibling_log_weights`` + the per-state sample variance (``baseline="per_state"``): for a
    transition committing one position ``i``, the locally optimal proposal given the position is
    ``q*(v) ∝ p_theta(v | x_t) gamma_s(x_t with v at i)`` (greedy twist, enumerated here). The
    expected gradient of the siblings' variance is ``2 grad KL(q || q*)``: over 4,000 rows in 40
    batches, every component of the mean gradient must be within 4.5 standard errors of it, while
    the gradient of a wrong target (the twist left out) is rejected. At ``q = q*`` the variance is
    zero for every row."""
    from lightning_smc.modules.log_variance import sibling_log_weights
    from lightning_smc.sampling.context import output_log_probs
    from lightning_smc.sampling.output import SMCPath

    module = toy_module(
        potential=RewardTiltSpec(alpha=ALPHA, num_samples=0),
        baseline="per_state",
        twist_estimate="paired",
        twist_samples=0,
    )
    base, mask = module.q.base_denoiser, module.q.mask_id

    def reward(x):
        return x.double().sum(-1) / 2

    one, pos = one_committed_transition(module)
    T, step = 6, int(one.step[0])
    lam_s = 1.0 if step + 1 == T else (step + 1) / T
    x_t = one.x_from[0, 0]
    with torch.no_grad():
        log_p = output_log_probs(base, base(x_t[None], one.t, None))[0, pos].double()
        values = [v for v in range(6) if v != mask]
        states = x_t.repeat(len(values), 1)
        states[:, pos] = torch.tensor(values)
        lp = output_log_probs(base, base(states, one.t.expand(len(values)), None))
        greedy = torch.where(states == mask, lp.argmax(-1), states)
        log_gamma = lam_s * reward(greedy) / ALPHA
    log_star = torch.full((6,), -torch.inf, dtype=torch.float64)
    log_star[values] = torch.log_softmax(log_p[values] + log_gamma, 0)

    proposal = TableProposal(6, 6, mask)
    with torch.no_grad():
        proposal.theta.copy_(torch.randn(6, 6, generator=torch.Generator().manual_seed(4)))

    def kl_grad(log_target):
        theta = proposal.theta.detach().clone().requires_grad_(True)
        log_q = torch.log_softmax(theta[pos, values].double(), 0)
        (2 * (log_q.exp() * (log_q - log_target[values])).sum()).backward()
        return theta.grad[pos, values]

    rows, batches = 100, 40

    def spread(batch, table):
        # sibling 0 is the recorded x_s: on-policy, it is a draw from the proposal too
        g = torch.Generator().manual_seed(10_000 + batch)
        probs = torch.softmax(table.theta.detach()[pos, values].double(), 0)
        drawn = torch.tensor(values)[torch.multinomial(probs, rows, True, generator=g)]
        x_to = one.x_to.expand(1, rows, -1).clone()
        x_to[0, :, pos] = drawn
        path = SMCPath(
            x_from=one.x_from.expand(1, rows, -1),
            x_to=x_to,
            t=one.t,
            step=one.step,
            twist_from=one.twist_from.expand(1, rows),
            twist_to=one.twist_to.expand(1, rows),
        )
        gens = [torch.Generator().manual_seed(batch * rows + r) for r in range(rows)]
        log_w, _ = sibling_log_weights(
            path, base, table, reward, ALPHA, lambda p: p, T, 2, 0, gens, mask
        )
        return ((log_w - log_w.detach().mean(-1, keepdim=True)) ** 2).sum(-1)  # J - 1 = 1

    grads = []
    for b in range(batches):
        proposal.zero_grad()
        spread(b, proposal).mean().backward()
        grads.append(proposal.theta.grad[pos, values].clone())
    grads = torch.stack(grads).double()
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(batches)
    z_right = ((mean - kl_grad(log_star)) / se).abs().max()
    assert float(z_right) < 4.5, (mean, kl_grad(log_star), se)
    wrong = torch.full((6,), -torch.inf, dtype=torch.float64)
    wrong[values] = torch.log_softmax(log_p[values], 0)  # the twist left out
    assert float(((mean - kl_grad(wrong)) / se).abs().max()) > 8
    # the optimum: q = q* at the committed position, every row's sibling variance is zero
    with torch.no_grad():
        proposal.theta[pos] = log_star.clamp_min(-1e4).float()
        at_optimum = spread(0, proposal)
    assert float(at_optimum.abs().max()) < 1e-8
    # the first sibling is the recorded transition
    gens = [torch.Generator().manual_seed(0)]
    log_w, log_ratio = sibling_log_weights(
        one, base, proposal, reward, ALPHA, lambda p: p, T, 3, 0, gens, mask
    )
    assert log_w.shape == (1, 1, 3) and log_ratio.shape == (1, 1)


def test_per_state_baseline_trains_and_refuses_bad_settings(tmp_path):
    module = toy_module(baseline="per_state", twist_estimate="paired", twist_samples=0, siblings=3)
    perturb(module.q)
    path = module.rollout("val", step=0)
    out = module.loss_on(path, step=0)
    assert {"sibling_var", "is_ess", "log_variance"} <= set(out) and float(out["sibling_var"]) > 0
    trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module)
    assert (tmp_path / "adapter" / "f_psi.safetensors").is_file()
    with pytest.raises(ValueError, match="siblings"):
        toy_module(baseline="per_state", twist_estimate="paired", siblings=1)
    with pytest.raises(ValueError, match="twist_estimate='paired'"):
        toy_module(baseline="per_state")
    with pytest.raises(ValueError, match="unmasking='ancestral'"):
        toy_module(baseline="per_state", twist_estimate="paired", unmasking="random")


def test_export_writes_the_checkpoints_adapter_also_when_it_started_from_one(tmp_path):
    """``python -m lightning_smc.export`` on an amortized run that began from ``init_adapter``:
    the exported folder holds the run's (here perturbed) LoRA weights and F_psi, with the
    structure (targets incl. the output layer) of the adapter it started from."""
    from lightning_smc.export import _export_adapter
    from lightning_smc.rewards import VaderSentiment

    args = {
        "base": "embedded",
        "potential": {"alpha": 0.1, "schedule": "linear", "num_samples": 0},
        "seq_len": 32,
        "num_steps": 16,
        "init_adapter": "embedded",
    }
    module = AmortizedProposalModule(
        reward=VaderSentiment(tokenizer="embedded"),
        **{**args, "potential": RewardTiltSpec(**args["potential"])},
    )
    perturb(module.q, std=0.05, seed=3)
    with torch.no_grad():
        module.f_psi.values.add_(1.0)
    node = {
        "class_path": "lightning_smc.modules.AmortizedProposalModule",
        "init_args": {
            **args,
            "reward": {
                "class_path": "lightning_smc.rewards.VaderSentiment",
                "init_args": {"tokenizer": "embedded"},
            },
        },
    }
    folder = _export_adapter(node, module.state_dict(), Path("x.ckpt"), Path("c.yaml"), tmp_path)
    from lightning_smc.models.loading import load_denoiser

    reloaded = LoRADenoiser.from_adapter(load_denoiser("embedded"), folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, module.q.mask_id, (2, 32), generator=g)
    x[:, ::3] = module.q.mask_id
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t), module.q(x, t))
    from lightning_smc.models.files import read_safetensors

    assert torch.equal(
        read_safetensors(folder / "f_psi.safetensors")["values"], module.f_psi.values
    )
