"""``maskgit`` unmasking (MaskGIT / Meissonic): schedule counts, annealed Gumbel confidence noise,
reproducible noise, and its target checked by enumeration on the exact toy (``exact.py``).

The sampler weighs a ranked move by its committed tokens only (``diffusion.unmasking``'s
docstring): with the base kernel the particles' law is the policy's own path law ``m(x0)``, which
``maskgit_law`` enumerates (candidates at every masked position, then a Plackett-Luce draw of the
committed set with weights ``c^(1 / tau_k)``), and a reward tilt targets ``m(x0) exp(r / alpha)``.
"""

import itertools
import math

import pytest
import torch
from exact import L, V, enumerate_states, estimate, max_z_score, state_index, toy_joint
from exact import z_of_normalizer as z_normalizer

import lightning_smc as ls
from lightning_smc.diffusion import MaskGIT, get_unmasking, plan_steps

Z_MAX = 4.5
ALPHA = 0.5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reward_fn(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


# ----------------------------------------------------------------------------- the policy
def test_registered_and_built_with_the_samplers_schedule():
    sampler = ls.SMCSampler(
        ls.ExactDenoiser(toy_joint(0)), num_steps=4, unmasking="maskgit", schedule="cosine"
    )
    assert isinstance(sampler.policy, MaskGIT)
    assert type(sampler.policy.schedule).__name__ == "CosineSchedule"
    with pytest.raises(ValueError, match="noise"):
        MaskGIT(noise=-1.0)


def test_cosine_counts_and_annealed_temperature():
    """From a full grid of 64 over 8 steps: the masked share after step k is cos(pi/2 (k+1)/8)
    (floored), tau_k = linspace(2, 0, 8); rows with fewer masks commit at least one."""
    policy = get_unmasking("maskgit")
    n, S = 64, 8
    masked = torch.ones(1, n, dtype=torch.bool)
    taus = []
    for plan in plan_steps(S, n):
        count = int(policy.count(masked, plan))
        keep = math.floor(n * math.cos(math.pi / 2 * (plan.index + 1) / S) + 1e-9)
        assert count == masked.sum() - keep
        masked[0, :count] = False
        masked = masked[:, torch.argsort(masked[0].long(), descending=True)]  # any order
        taus.append(policy.noise_temperature(plan))
    assert not masked.any()
    assert taus == pytest.approx(torch.linspace(2.0, 0.0, S).tolist())
    one = torch.zeros(1, n, dtype=torch.bool)
    one[0, 3] = True
    assert int(policy.count(one, plan_steps(S, n)[0])) == 1


def test_noise_free_ranking_is_low_confidence_order():
    policy = MaskGIT(noise=0.0)
    g = gen(0)
    masked = torch.rand(32, 10, generator=g) < 0.7
    confidence = torch.rand(32, 10, generator=g, dtype=torch.float64)
    plan = plan_steps(4, 10)[1]
    commit = policy.select(masked, plan, confidence=confidence)
    assert torch.equal(commit.sum(-1), policy.count(masked, plan))
    least_chosen = torch.where(commit, confidence, torch.inf).amin(-1)
    best_left = torch.where(masked & ~commit, confidence, -torch.inf).amax(-1)
    assert torch.all(least_chosen > best_left)


def test_noisy_choice_is_a_softmax_of_log_confidence_over_tau():
    """One commit among three positions: P(i) = c_i^(1/tau) / sum_j c_j^(1/tau)."""
    policy = MaskGIT(noise=1.5)
    R = 20000
    plan = plan_steps(3, 3)[0]  # tau = 1.5; keep floor(3 sin(pi/3)) = 2: commit one
    assert int(policy.count(torch.ones(1, 3, dtype=torch.bool), plan)) == 1
    c = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    u = torch.rand(R, 3, generator=gen(1), dtype=torch.float64)
    commit = policy.select(torch.ones(R, 3, dtype=torch.bool), plan, u=u, confidence=c.expand(R, 3))
    freq = commit.double().mean(0)
    p = c ** (1 / 1.5) / (c ** (1 / 1.5)).sum()
    assert torch.all((freq - p).abs() < Z_MAX * (p * (1 - p) / R).sqrt())


# ----------------------------------------------------------------------------- reproducibility
def test_noise_comes_from_each_prompts_generator():
    """The same prompt and seed give the same particles alone or inside a batch."""
    denoiser = ls.ExactDenoiser(toy_joint(3))
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=4,
        num_steps=3,
        unmasking="maskgit",
        schedule="maskgit_cosine",
        potential=ls.SelfReward(),
    )
    both = sampler.sample(L, generator=[gen(5), gen(6)])
    alone = sampler.sample(L, generator=[gen(6)])
    again = sampler.sample(L, generator=[gen(5), gen(6)])
    assert torch.equal(both.tokens[1], alone.tokens[0])
    assert torch.equal(both.log_weights[1], alone.log_weights[0])
    assert torch.equal(both.tokens, again.tokens)


# ----------------------------------------------------------------------------- exact law
def maskgit_law(denoiser: ls.ExactDenoiser, policy: MaskGIT, num_steps: int) -> torch.Tensor:
    """The law over the ``V**L`` clean states of the plain ``maskgit`` sampler, by enumeration."""
    mask = denoiser.mask_id
    frontier = {tuple([mask] * L): 1.0}
    for plan in plan_steps(num_steps, L):
        tau = policy.noise_temperature(plan)
        nxt: dict[tuple, float] = {}
        for state, mass in frontier.items():
            x = torch.tensor([state])
            probs = torch.softmax(denoiser(x, torch.ones(1))[0, :, :V], -1)  # [L, V]
            where = [i for i in range(L) if state[i] == mask]
            n = int(policy.count(x == mask, plan))
            for values in itertools.product(range(V), repeat=len(where)):
                conf = {i: float(probs[i, v]) for i, v in zip(where, values, strict=True)}
                p_values = math.prod(conf.values())
                for chosen, p_set in _committed_sets(conf, n, tau):
                    new = list(state)
                    for i, v in zip(where, values, strict=True):
                        if i in chosen:
                            new[i] = v
                    key = tuple(new)
                    nxt[key] = nxt.get(key, 0.0) + mass * p_values * p_set
        frontier = nxt
    law = torch.zeros(V**L, dtype=torch.float64)
    for state, mass in frontier.items():
        law[state_index(torch.tensor(state))] += mass
    return law


def _committed_sets(conf: dict[int, float], n: int, tau: float):
    """``(set, probability)``: the top-``n`` of ``log c + tau * Gumbel`` (Plackett-Luce)."""
    if n >= len(conf):
        yield frozenset(conf), 1.0
        return
    assert tau > 0, "the enumeration covers noisy steps and the block's last step"
    weight = {i: c ** (1.0 / tau) for i, c in conf.items()}
    sets: dict[frozenset, float] = {}
    for order in itertools.permutations(conf, n):
        p, left = 1.0, sum(weight.values())
        for i in order:
            p *= weight[i] / left
            left -= weight[i]
        sets[frozenset(order)] = sets.get(frozenset(order), 0.0) + p
    yield from sets.items()


def _run(denoiser, num_steps, batch, particles, seed, **kwargs):
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=particles,
        num_steps=num_steps,
        unmasking="maskgit",
        schedule="maskgit_cosine",
        **kwargs,
    )
    return sampler.sample(seq_len=L, batch_size=batch, generator=gen(seed))


def _check(out, target, Z, wrong):
    pi_hat, se = estimate(out)
    n = out.tokens.shape[0] * out.tokens.shape[1]
    assert max_z_score(pi_hat, se, target, n) < Z_MAX
    assert max_z_score(pi_hat, se, wrong, n) > 2 * Z_MAX, "the test cannot tell them apart"
    assert z_normalizer(out, Z) < Z_MAX


@pytest.mark.parametrize("num_steps", [2, 3])  # commits (2, 2) and (1, 1, 2) of 4 positions
def test_plain_maskgit_sampler_follows_its_enumerated_law(num_steps):
    p0 = toy_joint(11)
    denoiser = ls.ExactDenoiser(p0)
    law = maskgit_law(denoiser, MaskGIT(noise=2.0), num_steps)
    assert float(law.sum()) == pytest.approx(1.0, abs=1e-12)
    out = _run(denoiser, num_steps, batch=20000, particles=1, seed=num_steps)
    _check(out, law, 1.0, p0.flatten())  # confidence ordering moves the law away from p0


def test_reward_tilt_with_maskgit_targets_the_tilted_path_law():
    """Base kernel + reward tilt: the weights are exact for ``m(x0) exp(r / alpha)``."""
    p0 = toy_joint(12)
    denoiser = ls.ExactDenoiser(p0)
    law = maskgit_law(denoiser, MaskGIT(noise=2.0), 3)
    target = law * torch.exp(reward_fn(enumerate_states()) / ALPHA)
    potential = ls.RewardTilt(reward_fn, alpha=ALPHA, schedule="linear")
    out = _run(denoiser, 3, batch=3000, particles=8, seed=1, potential=potential)
    wrong = p0.flatten() * torch.exp(reward_fn(enumerate_states()) / ALPHA)
    _check(out, target, float(target.sum()), wrong)
