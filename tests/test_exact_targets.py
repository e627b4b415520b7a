"""Exact enumeration (DESIGN.md §3): every sampler hits its known target on V=3, L=4.

Each test pools ``B`` independent SMC runs with weights ``Ẑ_b W_bi`` (see ``exact.py``) and
checks every state within ``Z_MAX`` standard errors, and ``E[Ẑ] = Z`` within ``Z_MAX`` standard
errors of the mean. Each test also checks that the same estimate *rejects* a wrong target, so
the tolerance has power (removing a weight term makes these tests fail: see the issue note).
"""

import pytest
import torch
from exact import L, enumerate_states, estimate, max_z_score, toy_joint, z_of_normalizer

import lightning_smc as ls

Z_MAX = 4.5
B, N = 3000, 8


def run(denoiser, seed=0, batch=B, particles=N, **kwargs):
    sampler = ls.SMCSampler(
        denoiser, num_particles=particles, num_steps=L, unmasking="random", **kwargs
    )
    return sampler.sample(
        seq_len=L, batch_size=batch, generator=torch.Generator().manual_seed(seed)
    )


def check(out, target, Z, wrong_target):
    pi_hat, se = estimate(out)
    n = out.tokens.shape[0] * out.tokens.shape[1]
    assert max_z_score(pi_hat, se, target, n) < Z_MAX
    assert max_z_score(pi_hat, se, wrong_target, n) > 2 * Z_MAX, (
        "the test cannot tell the wrong target apart"
    )
    assert z_of_normalizer(out, Z) < Z_MAX


def reward_fn(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


ALPHA = 0.5


def tilted(p0):
    states = enumerate_states()
    return p0.flatten() * torch.exp(reward_fn(states) / ALPHA)


def test_base_sampler_reproduces_p0():
    p0 = toy_joint(0)
    out = run(ls.ExactDenoiser(p0), batch=20000, particles=1)
    check(out, p0.flatten(), 1.0, tilted(p0))


def test_self_reward_targets_p0_squared():
    p0 = toy_joint(1).flatten()
    out = run(ls.ExactDenoiser(p0.view((3,) * L)), potential=ls.SelfReward())
    check(out, p0**2, float((p0**2).sum()), p0)


def test_self_reward_beta_targets_power():
    p0 = toy_joint(2).flatten()
    out = run(
        ls.ExactDenoiser(p0.view((3,) * L)),
        potential=ls.SelfReward(beta=0.5),
        resample_when="always",
    )
    check(out, p0**1.5, float((p0**1.5).sum()), p0**2)


@pytest.mark.parametrize(
    "schedule,num_samples",
    [("constant", 0), ("linear", 1), ("linear", 2), (lambda u: u**2, 1)],
    ids=["constant-greedy", "linear-1", "linear-2", "custom"],
)
def test_reward_tilt_base_proposal(schedule, num_samples):
    p0 = toy_joint(3)
    potential = ls.RewardTilt(reward_fn, alpha=ALPHA, schedule=schedule, num_samples=num_samples)
    out = run(ls.ExactDenoiser(p0), potential=potential)
    target = tilted(p0)
    check(out, target, float(target.sum()), p0.flatten())


def test_reward_tilt_with_a_different_denoiser_proposal():
    p0, q0 = toy_joint(4), toy_joint(5, sharpness=1.0)
    potential = ls.RewardTilt(reward_fn, alpha=ALPHA, schedule="linear")
    out = run(
        ls.ExactDenoiser(p0),
        potential=potential,
        proposal=ls.DenoiserProposal(ls.ExactDenoiser(q0)),
    )
    target = tilted(p0)
    check(out, target, float(target.sum()), tilted(q0))


def test_denoiser_proposal_without_potential_targets_base():
    p0, q0 = toy_joint(6), toy_joint(7, sharpness=1.0)
    out = run(
        ls.ExactDenoiser(p0),
        proposal=ls.DenoiserProposal(ls.ExactDenoiser(q0)),
        resampling="residual",
    )
    check(out, p0.flatten(), 1.0, q0.flatten())


def test_uncorrected_proposal_is_documented_as_inexact():
    """The ICLR-code variant drops log p - log q: its target is tilted q, not tilted p."""
    p0, q0 = toy_joint(4), toy_joint(5, sharpness=1.0)
    potential = ls.RewardTilt(reward_fn, alpha=ALPHA, schedule="linear")
    proposal = ls.DenoiserProposal(ls.ExactDenoiser(q0), correct=False)
    pi_hat, se = estimate(run(ls.ExactDenoiser(p0), potential=potential, proposal=proposal))
    assert max_z_score(pi_hat, se, tilted(q0), B * N) < Z_MAX
    assert max_z_score(pi_hat, se, tilted(p0), B * N) > 2 * Z_MAX


@pytest.mark.parametrize("two_denoisers", [False, True])
def test_product_target_with_guidance_weight_two(two_denoisers):
    p1, p2 = toy_joint(8), toy_joint(9, sharpness=1.0)
    w = 2.0
    if two_denoisers:
        potential = ls.ProductTarget(weight=w, second_denoiser=ls.ExactDenoiser(p2))
        out = run(ls.ExactDenoiser(p1), potential=potential, resampling="stratified")
    else:  # one denoiser, two conditions: cond=1 -> p1, second_cond=None -> p2 (CFG)
        denoiser = ls.ExactDenoiser(torch.stack([p2, p1]))
        potential = ls.ProductTarget(weight=w, second_cond=None)
        sampler = ls.SMCSampler(
            denoiser, num_particles=N, num_steps=L, unmasking="random", potential=potential
        )
        out = sampler.sample(
            L,
            batch_size=B,
            cond=torch.ones(B, dtype=torch.long),
            generator=torch.Generator().manual_seed(0),
        )
    target = p1.flatten() ** w * p2.flatten() ** (1 - w)
    check(out, target, float(target.sum()), p1.flatten())
