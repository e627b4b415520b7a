"""Extension points (DESIGN.md §4), each on a toy model with an exact answer.

- **Remasking kernels (ReMDM)**: the exact marginal of the ReMDM chain on V=3, L=4 by dynamic
  programming over the 4^4 partially masked states; the base sampler must reproduce it and
  reward tilting with the base proposal must reproduce ``marginal * exp(r / alpha)`` with
  ``E[Ẑ] = Z``. The ancestral chain's marginal (remasking switched off) is a different law,
  and the same estimates must reject it (the tolerance has power).
- **State that follows particles**: a denoiser whose per-row state must move with its rows
  gives the same particles and weights as without state, for every resampling scheme.
- **Structured conditioning**: a dict ``cond`` (label + an embedding) and a CFG product
  target whose "null" condition has the same structure.
- **Sub-vocabulary outputs on a token grid**: a network scoring a codebook of 3 ids inside a
  vocabulary of 5 (one unused id, the mask last) on a 2x2 grid.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from exact import L, V, estimate, max_z_score, state_index, toy_joint, z_of_normalizer

import lightning_smc as ls
from lightning_smc.diffusion import Ancestral, ReMDM, plan_steps, transition_log_prob

Z_MAX = 4.5  # as in test_exact_targets.py
ALPHA = 0.5
M = V  # the toy's mask id


def reward_fn(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


def check(out, target, Z, wrong_target):
    pi_hat, se = estimate(out)
    n = out.tokens.shape[0] * out.tokens.shape[1]
    assert max_z_score(pi_hat, se, target, n) < Z_MAX
    assert max_z_score(pi_hat, se, wrong_target, n) > 2 * Z_MAX, "no power against the wrong law"
    assert z_of_normalizer(out, Z) < Z_MAX


# --------------------------------------------------------------------------- ReMDM by DP
ALL = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # [256, L], M = masked
CLEAN = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [81, L]


def _probabilities(policy, plan) -> tuple[float, float]:
    """``(p_unmask, sigma)`` written out from the schedule (not read from the policy)."""
    a = lambda u: 1.0 - u  # noqa: E731  (the linear schedule)
    a_t, a_s = a(plan.t), a(plan.s)
    if plan.closes_block:
        return 1.0, 0.0
    if isinstance(policy, ReMDM):
        sigma_max = 1.0 if a_t <= 0 else min(1.0, (1 - a_s) / a_t)
        sigma = min(policy.eta, sigma_max) if policy.mode == "max_cap" else policy.eta * sigma_max
    else:
        sigma = 0.0
    return (a_s - (1 - sigma) * a_t) / (1 - a_t), sigma


def chain_marginal(denoiser, policy, steps: int) -> torch.Tensor:
    """Law of the final state over the 81 clean states, by DP over the 256 partial states."""
    law = torch.zeros(len(ALL), dtype=torch.float64)
    law[-1] = 1.0  # all masked: (M, M, M, M) is the last row of ALL
    for plan in plan_steps(steps, L):
        p_unmask, sigma = _probabilities(policy, plan)
        nxt = torch.zeros_like(law)
        live = law.nonzero().flatten()
        probs = torch.softmax(denoiser(ALL[live], torch.full((len(live),), plan.t)), -1)
        for j, i in enumerate(live.tolist()):
            x = ALL[i]
            per_pos = torch.zeros(L, V + 1, dtype=torch.float64)  # law of each position at s
            for pos in range(L):
                if x[pos] == M:
                    per_pos[pos, :V] = p_unmask * probs[j, pos, :V]
                    per_pos[pos, M] = 1 - p_unmask
                else:
                    per_pos[pos, x[pos]] = 1 - sigma
                    per_pos[pos, M] += sigma
            move = torch.ones(len(ALL), dtype=torch.float64)
            for pos in range(L):
                move *= per_pos[pos, ALL[:, pos]]
            nxt += law[i] * move
        law = nxt
    clean = (ALL != M).all(-1)
    assert torch.isclose(law[clean].sum(), torch.tensor(1.0, dtype=torch.float64))
    index = (ALL[clean] * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    out = torch.zeros(len(CLEAN), dtype=torch.float64)
    out[index] = law[clean]
    return out


REMDM_STEPS = 6


@pytest.fixture(scope="module")
def remdm_setup():
    denoiser = ls.ExactDenoiser(toy_joint(11, sharpness=6.0))
    policy = ReMDM(eta=1.0, mode="rescale")  # sigma = sigma_max: remasking as strong as allowed
    marginal = chain_marginal(denoiser, policy, REMDM_STEPS)
    ancestral = chain_marginal(denoiser, Ancestral(), REMDM_STEPS)
    return denoiser, policy, marginal, ancestral


def test_remdm_sigma_follows_the_paper_schedules():
    plans = plan_steps(4, L)
    for mode, eta in (("max_cap", 0.4), ("rescale", 0.5)):
        policy = ReMDM(eta=eta, mode=mode)
        for plan in plans:
            assert policy.event_probabilities(plan) == pytest.approx(_probabilities(policy, plan))
    for bad in (float("nan"), float("inf"), -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="eta"):
            ReMDM(eta=bad)
    with pytest.raises(ValueError, match="mode"):
        ReMDM(mode="loop")


def test_remdm_transition_probabilities_sum_to_one():
    """``transition_log_prob`` counts every event: over all 256 next states it sums to 1."""
    denoiser = ls.ExactDenoiser(toy_joint(11))
    policy = ReMDM(eta=0.4)
    g = torch.Generator().manual_seed(0)
    for plan in plan_steps(REMDM_STEPS, L)[:-1]:
        x_t = ALL[torch.randint(len(ALL), (5,), generator=g)]
        log_q = torch.log_softmax(denoiser(x_t, torch.full((5,), plan.t)), -1)
        for r in range(5):
            lp = transition_log_prob(
                policy, plan, x_t[r].expand(len(ALL), L), ALL, log_q[r].expand(len(ALL), L, -1), M
            )
            assert float(torch.logsumexp(lp, 0).exp()) == pytest.approx(1.0, abs=1e-12)


def test_remdm_base_sampler_reproduces_the_chain_marginal(remdm_setup):
    denoiser, policy, marginal, ancestral = remdm_setup
    assert (marginal - ancestral).abs().sum() > 0.05  # remasking changes the law
    sampler = ls.SMCSampler(denoiser, num_particles=1, num_steps=REMDM_STEPS, unmasking=policy)
    out = sampler.sample(L, batch_size=60000, generator=torch.Generator().manual_seed(1))
    assert not (out.tokens == M).any()
    check(out, marginal, 1.0, ancestral)


def test_remdm_reward_tilt_reproduces_the_tilted_marginal(remdm_setup):
    denoiser, policy, marginal, ancestral = remdm_setup
    tilt = torch.exp(reward_fn(CLEAN) / ALPHA)
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=8,
        num_steps=REMDM_STEPS,
        unmasking=policy,
        potential=ls.RewardTilt(reward_fn, alpha=ALPHA, schedule="linear"),
    )
    out = sampler.sample(L, batch_size=8000, generator=torch.Generator().manual_seed(2))
    check(out, marginal * tilt, float((marginal * tilt).sum()), ancestral * tilt)


def test_remdm_by_name_and_prompt_tokens_are_never_remasked():
    denoiser = ls.ExactDenoiser(toy_joint(11))
    sampler = ls.SMCSampler(denoiser, num_particles=4, num_steps=3, unmasking="remdm")
    assert isinstance(sampler.policy, ReMDM)
    prompt = torch.tensor([[2, M, 1]] * 50)  # infilling: positions 0 and 2 are the prompt
    seen = []
    sampler.denoiser = _Spy(denoiser, seen)
    sampler.policy = ReMDM(eta=1.0, mode="rescale")
    sampler.kernel.policy = sampler.policy
    out = sampler.sample(L, prompt=prompt, infill=True, generator=torch.Generator().manual_seed(3))
    assert (out.tokens[..., 0] == 2).all() and (out.tokens[..., 2] == 1).all()
    assert any(((x[:, 1] == M) & (x[:, 3] != M)).any() for x in seen[1:]) or any(
        ((x[:, 3] == M) & (x[:, 1] != M)).any() for x in seen[1:]
    )


class _Spy:
    def __init__(self, denoiser, seen):
        self.denoiser, self.seen = denoiser, seen
        self.vocab_size, self.mask_id = denoiser.vocab_size, denoiser.mask_id

    def __call__(self, x_t, t, cond=None):
        self.seen.append(x_t.clone())
        return self.denoiser(x_t, t, cond)


# --------------------------------------------------------------------------- per-row state
class StatefulDenoiser:
    """An exact denoiser with a per-row "KV cache": the tokens each row had at its last call.

    Unmasking only adds tokens, so a row's cached tokens must be a prefix of what it now
    holds; if the sampler forgets to move the state with the rows, a resampled row meets
    another particle's cache and the call fails. ``reorder_state`` records every announcement."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.vocab_size, self.mask_id = denoiser.vocab_size, denoiser.mask_id
        self.state: torch.Tensor | None = None
        self.announced: list[torch.Tensor] = []

    def reorder_state(self, index: torch.Tensor) -> None:
        self.announced.append(index.clone())
        if self.state is None or len(self.announced) == 1:
            self.state = None  # a new run: index maps rows to prompts, nothing cached yet
            return
        fresh = index < 0
        self.state = self.state[index.clamp_min(0)]
        self.state[fresh] = self.mask_id  # rebuilt at the next call

    def start(self) -> None:
        self.state, self.announced = None, []

    def __call__(self, x_t, t, cond=None):
        if self.state is not None:
            kept = self.state != self.mask_id
            if not (x_t[kept] == self.state[kept]).all():
                raise RuntimeError("StatefulDenoiser: a row's state did not follow it")
        self.state = x_t.clone()
        return self.denoiser(x_t, t, cond)


@pytest.mark.parametrize("resampling", ["systematic", "multinomial", "stratified", "residual"])
@pytest.mark.parametrize("unmasking", ["random", "low_confidence"])
def test_state_follows_particles_through_every_resample(resampling, unmasking):
    exact = ls.ExactDenoiser(toy_joint(5))
    stateful = StatefulDenoiser(exact)

    def run(denoiser):
        sampler = ls.SMCSampler(
            denoiser,
            num_particles=6,
            num_steps=L,
            unmasking=unmasking,
            potential=ls.SelfReward(),
            resampling=resampling,
            resample_when="always",
        )
        return sampler.sample(L, batch_size=5, generator=torch.Generator().manual_seed(7))

    stateful.start()
    with_state, without = run(stateful), run(exact)
    assert with_state.resampled.any()
    assert torch.equal(with_state.tokens, without.tokens)
    assert torch.equal(with_state.log_weights, without.log_weights)
    assert torch.equal(with_state.log_normalizer, without.log_normalizer)
    first = stateful.announced[0]  # the expansion: each row's prompt
    assert torch.equal(first, torch.arange(5).repeat_interleave(6))
    assert len(stateful.announced) == 1 + int(with_state.resampled.any(0).sum())


def test_a_state_that_does_not_follow_is_caught():
    """The toy's check has power: drop the announcements and the run fails."""
    stateful = StatefulDenoiser(ls.ExactDenoiser(toy_joint(5)))
    stateful.reorder_state = lambda index: None  # forgets every move
    sampler = ls.SMCSampler(
        stateful,
        num_particles=6,
        num_steps=L,
        unmasking="random",
        potential=ls.SelfReward(),
        resample_when="always",
    )
    with pytest.raises(RuntimeError, match="did not follow"):
        sampler.sample(L, batch_size=5, generator=torch.Generator().manual_seed(7))


def test_stateful_denoiser_refuses_the_logit_cache():
    stateful = StatefulDenoiser(ls.ExactDenoiser(toy_joint(5)))
    with pytest.raises(ValueError, match="per-row"):
        ls.SMCSampler(stateful, num_particles=2, cache=True)


def test_a_stateful_proposal_network_is_told_too():
    exact = ls.ExactDenoiser(toy_joint(5))
    q = StatefulDenoiser(ls.ExactDenoiser(toy_joint(6)))
    q.start()
    sampler = ls.SMCSampler(
        exact,
        num_particles=4,
        num_steps=L,
        unmasking="random",
        potential=ls.SelfReward(),
        proposal=ls.DenoiserProposal(q),
        resample_when="always",
    )
    out = sampler.sample(L, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert len(q.announced) == 1 + int(out.resampled.any(0).sum())


# --------------------------------------------------------------------------- structured cond
class DictConditioned:
    """An exact denoiser of several joints selected by ``cond["label"]``; ``cond["embedding"]``
    must be the row's label one-hot (so a misrouted entry is caught)."""

    def __init__(self, joints):
        self.exact = ls.ExactDenoiser(joints)
        self.vocab_size, self.mask_id = self.exact.vocab_size, self.exact.mask_id
        self.labels = joints.shape[0]

    def __call__(self, x_t, t, cond=None):
        assert isinstance(cond, dict) and cond["label"].shape == (x_t.shape[0],)
        expected = torch.nn.functional.one_hot(cond["label"], self.labels).double()
        if not torch.equal(cond["embedding"], expected):
            raise RuntimeError("DictConditioned: embedding and label belong to different rows")
        return self.exact(x_t, t, cond["label"])


def _cond(labels, num_labels=4):
    labels = torch.as_tensor(labels)
    return {"label": labels, "embedding": torch.nn.functional.one_hot(labels, num_labels).double()}


def test_dict_cond_cfg_product_target_is_exact():
    # label 0 is the "null" class (4 joints: a leading dimension of V=3 would read as a 5th axis)
    joints = torch.stack([toy_joint(s) for s in (20, 21, 22, 23)])
    denoiser = DictConditioned(joints)
    w, B = 2.0, 3000
    labels = torch.tensor([1, 2]).repeat(B // 2)  # alternate: each prompt has its own label
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=8,
        num_steps=L,
        unmasking="random",
        potential=ls.ProductTarget(weight=w, second_cond=_cond([0])),
        resample_when="always",
    )
    out = sampler.sample(L, B, cond=_cond(labels), generator=torch.Generator().manual_seed(4))
    p = joints.reshape(4, -1)
    for label in (1, 2):
        rows = (labels == label).nonzero().flatten()
        part = ls.SMCOutput(
            out.tokens[rows],
            out.log_weights[rows],
            out.log_normalizer[rows],
            out.ess[rows],
            out.resampled[rows],
            out.ancestors[rows],
            out.nfe,
            out.overtakes[rows],
        )
        target = p[label] ** w * p[0] ** (1 - w)
        other = p[3 - label] ** w * p[0] ** (1 - w)
        check(part, target, float(target.sum()), other)


# --------------------------------------------------------------------------- codebook on a grid
class GridNetwork:
    """Exact conditionals of a joint over a 2x2 grid of codebook ids ``0..2``, computed on the
    ``[B, 2, 2]`` grid and returned for the 3 codebook ids only (no mask column)."""

    def __init__(self, joint):
        self.exact = ls.ExactDenoiser(joint)

    def __call__(self, x_t, t, cond=None):
        grid = x_t.view(-1, 2, 2)  # the network's own view of the image
        flat = torch.where(grid == 4, self.exact.mask_id, grid).view(x_t.shape[0], -1)
        return self.exact(flat, t, cond)[..., :3]


def test_codebook_inside_a_larger_vocabulary_on_a_token_grid():
    joint = toy_joint(30)  # V=3, L=4: a 2x2 grid
    denoiser = ls.CodebookDenoiser(GridNetwork(joint), vocab_size=5, mask_id=4, grid_shape=(2, 2))
    out = ls.SMCSampler(denoiser, num_particles=1, num_steps=L, unmasking="random").sample(
        L, batch_size=20000, generator=torch.Generator().manual_seed(5)
    )
    assert out.tokens.max() < 3  # never id 3 (outside the codebook) nor the mask
    counts = torch.bincount(state_index(out.tokens.view(-1, L)), minlength=3**L).double()
    pi_hat = counts / counts.sum()
    se = (pi_hat * (1 - pi_hat) / counts.sum()).sqrt()
    assert max_z_score(pi_hat, se, joint.flatten(), int(counts.sum())) < Z_MAX
    with pytest.raises(ValueError, match="grid"):
        denoiser(torch.full((1, 5), 4), torch.ones(1))
