"""Masked-diffusion math (``lightning_smc.diffusion``) and sampler-level invariants.

Statistical checks use ``Z_MAX`` standard errors derived from the number of draws; every test
uses fixed seeds.
"""

import math

import pytest
import torch

import lightning_smc as ls
from lightning_smc.diffusion import (
    UNMASKING_POLICIES,
    Schedule,
    get_schedule,
    get_unmasking,
    gumbel_max,
    inverse_cdf,
    plan_steps,
    proposal_log_probs,
    sample_categorical,
)

Z_MAX = 5.0
SCHEDULES = ["linear", "cosine", "maskgit_cosine", "loglinear"]
POLICIES = sorted(UNMASKING_POLICIES)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================== schedules
@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_monotone_bounded_and_starts_clean(name):
    sched = get_schedule(name)
    t = torch.linspace(0.0, 1.0, 10_001, dtype=torch.float64)
    a = sched.alpha(t)
    assert a.shape == t.shape
    assert torch.all(a[1:] - a[:-1] <= 0.0), "alpha must be non-increasing"
    assert torch.all((a >= 0.0) & (a <= 1.0))
    assert a[0].item() == pytest.approx(1.0, abs=1e-12)
    assert a[-1].item() < 0.01  # (almost) fully masked at t = 1
    assert a[-1] < a[0]


def test_get_schedule_unknown_and_passthrough():
    with pytest.raises(ValueError, match="nope"):
        get_schedule("nope")
    sched = get_schedule("cosine")
    assert get_schedule(sched) is sched


@pytest.mark.parametrize("name", SCHEDULES)
def test_unmask_probability_in_unit_interval(name):
    sched = get_schedule(name)
    grid = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    t, s = torch.meshgrid(grid, grid, indexing="ij")
    keep = s < t
    p = sched.unmask_probability(t[keep], s[keep])
    assert torch.all((p >= 0.0) & (p <= 1.0))
    # reaching s = 0 commits everything that is still masked
    if name in ("linear", "cosine"):
        p0 = sched.unmask_probability(grid[1:], torch.zeros_like(grid[1:]))
        assert torch.allclose(p0, torch.ones_like(p0), atol=1e-9)
    # closed form against alpha
    tt, ss = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    a_t, a_s = sched.alpha(tt), sched.alpha(ss)
    assert sched.unmask_probability(tt, ss).item() == pytest.approx(
        ((a_s - a_t) / (1 - a_t)).item(), rel=1e-12
    )


@pytest.mark.parametrize("name", SCHEDULES)
def test_loss_weight_positive(name):
    sched = get_schedule(name)
    t = torch.linspace(0.01, 1.0, 500, dtype=torch.float64)
    w = sched.loss_weight(t)
    assert w.shape == t.shape
    assert torch.all(torch.isfinite(w)) and torch.all(w > 0)


def test_loglinear_loss_weight_matches_autograd():
    sched = get_schedule("loglinear")
    t = torch.linspace(0.01, 1.0, 500, dtype=torch.float64)
    closed = sched.loss_weight(t)
    auto = Schedule.loss_weight(sched, t)
    assert torch.allclose(closed, auto, rtol=1e-5, atol=1e-5)
    # and the linear schedule's autograd weight is 1 / t
    lin = get_schedule("linear").loss_weight(t)
    assert torch.allclose(lin, 1.0 / t, rtol=1e-9)


# =========================================================================== categorical
V = 7
MASK = 3


def test_mask_token_never_drawn_even_if_largest():
    logits = torch.randn(4000, V, generator=gen(0), dtype=torch.float64)
    logits[:, MASK] = 50.0
    log_q = proposal_log_probs(logits, mask_id=MASK)
    assert torch.all(torch.isneginf(log_q[:, MASK]))
    assert torch.allclose(
        torch.logsumexp(log_q, -1), torch.zeros(4000, dtype=torch.float64), atol=1e-10
    )
    for temperature, top_p in [(1.0, 1.0), (0.5, 0.9), (2.0, 0.3), (0.0, 1.0)]:
        tokens, lq = sample_categorical(logits, temperature, top_p, gen(1), mask_id=MASK)
        assert tokens.shape == (4000,)
        assert not torch.any(tokens == MASK)
        assert torch.all(torch.isfinite(lq))


def test_proposal_log_probs_tempered_softmax():
    logits = torch.randn(5, V, generator=gen(2), dtype=torch.float64)
    for temperature in (0.3, 1.0, 2.5):
        expected = torch.log_softmax(logits / temperature, -1)
        assert torch.allclose(proposal_log_probs(logits, temperature), expected, atol=1e-12)
    # the caller's logits are not modified
    before = logits.clone()
    proposal_log_probs(logits, 0.7, 0.5, mask_id=MASK)
    assert torch.equal(logits, before)


def test_temperature_zero_is_greedy():
    logits = torch.randn(200, V, generator=gen(3), dtype=torch.float64)
    logits[:100, MASK] = 100.0  # greedy must skip the mask token
    log_q = proposal_log_probs(logits, temperature=0.0, mask_id=MASK)
    masked_logits = logits.clone()
    masked_logits[:, MASK] = -torch.inf
    argmax = masked_logits.argmax(-1)
    q = log_q.exp()
    assert torch.allclose(
        q.gather(-1, argmax.unsqueeze(-1)), torch.ones(200, 1, dtype=torch.float64)
    )
    assert torch.allclose(q.sum(-1), torch.ones(200, dtype=torch.float64))
    for seed in range(3):
        tokens, lq = sample_categorical(logits, temperature=0.0, generator=gen(seed), mask_id=MASK)
        assert torch.equal(tokens, argmax)
        assert torch.allclose(lq, torch.zeros_like(lq))


def _top_p_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest set of most probable tokens with mass >= top_p (at least one), renormalized."""
    p = torch.softmax(logits, -1)
    out = torch.zeros_like(p)
    for r in range(p.shape[0]):
        order = p[r].argsort(descending=True)
        mass, keep = 0.0, []
        for i in order.tolist():
            keep.append(i)
            mass += p[r, i].item()
            if mass >= top_p:
                break
        out[r, keep] = p[r, keep] / p[r, keep].sum()
    return out


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.55, 0.8, 0.95, 1.0])
def test_top_p_keeps_smallest_set_with_enough_mass(top_p):
    logits = torch.randn(300, V, generator=gen(4), dtype=torch.float64) * 2
    q = proposal_log_probs(logits, top_p=top_p).exp()
    ref = _top_p_reference(logits, top_p)
    assert torch.allclose(q, ref, atol=1e-10)
    kept = q > 0
    assert torch.all(kept.sum(-1) >= 1)
    assert torch.allclose(q.sum(-1), torch.ones(300, dtype=torch.float64))
    # kept tokens carry at least top_p of the original mass; dropping the least likely kept
    # token would leave less than top_p
    p = torch.softmax(logits, -1)
    kept_mass = (p * kept).sum(-1)
    assert torch.all(kept_mass >= top_p - 1e-12)
    smallest_kept = torch.where(kept, p, torch.inf).amin(-1)
    assert torch.all((kept_mass - smallest_kept < top_p) | (kept.sum(-1) == 1))


def test_top_p_exact_boundary_keeps_the_smallest_set():
    """Dyadic probabilities make the cumulative masses exact: mass exactly ``top_p`` is enough."""
    logits = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25], dtype=torch.float64))
    for top_p, kept in [(0.5, [1]), (0.75, [1, 3]), (0.875, [0, 1, 3]), (0.8, [0, 1, 3])]:
        q = proposal_log_probs(logits, top_p=top_p).exp()
        assert (q > 0).nonzero().flatten().tolist() == kept, top_p
        expected = torch.zeros(4, dtype=torch.float64)
        expected[kept] = torch.softmax(logits, -1)[kept] / torch.softmax(logits, -1)[kept].sum()
        assert torch.allclose(q, expected, atol=1e-12)


def test_top_p_tiny_keeps_one_token_and_respects_mask():
    logits = torch.randn(50, V, generator=gen(5), dtype=torch.float64)
    logits[:, MASK] = 30.0
    q = proposal_log_probs(logits, top_p=1e-6, mask_id=MASK).exp()
    assert torch.all((q > 0).sum(-1) == 1)
    masked_logits = logits.clone()
    masked_logits[:, MASK] = -torch.inf
    assert torch.equal(q.argmax(-1), masked_logits.argmax(-1))
    assert torch.all(q[:, MASK] == 0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_gumbel_max_frequencies_match_softmax(with_mask):
    n = 200_000
    logits = torch.tensor([1.2, -0.4, 0.0, 2.0, -3.0, 0.7, -1.5], dtype=torch.float64)
    mask_id = 3 if with_mask else None
    log_q = proposal_log_probs(logits, mask_id=mask_id)
    p = log_q.exp()
    u = torch.rand(n, V, generator=gen(6), dtype=torch.float64)
    tokens = gumbel_max(log_q.expand(n, V), u)
    assert tokens.shape == (n,)
    counts = torch.bincount(tokens, minlength=V).to(torch.float64)
    se = torch.sqrt(n * p * (1 - p))
    err = (counts - n * p).abs()
    zero = se == 0
    assert torch.all(err[zero] == 0)
    assert torch.all(err[~zero] <= Z_MAX * se[~zero]), f"z = {(err / se).tolist()}"


def test_gumbel_max_uses_float64_noise():
    """Uniforms that differ only beyond float32 precision still decide the draw."""
    log_q = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float32))
    u = torch.tensor([[1 - 1e-11, 1 - 1e-12], [1 - 1e-12, 1 - 1e-11]], dtype=torch.float64)
    assert gumbel_max(log_q, u).tolist() == [1, 0]
    tiny = torch.tensor([[1e-300, 1e-200]], dtype=torch.float64)
    assert gumbel_max(log_q[:1], tiny).tolist() == [1]
    # against the float64 formula on random inputs
    logits = torch.randn(500, V, generator=gen(12), dtype=torch.float64)
    u = torch.rand(500, V, generator=gen(13), dtype=torch.float64)
    assert torch.equal(gumbel_max(logits, u), (logits - torch.log(-torch.log(u))).argmax(-1))


def test_gumbel_frequency_check_has_power():
    """The same tolerance rejects a slightly wrong distribution (tempered by 1.1)."""
    n = 200_000
    logits = torch.tensor([1.2, -0.4, 0.0, 2.0, -3.0, 0.7, -1.5], dtype=torch.float64)
    tokens = gumbel_max(
        torch.log_softmax(logits / 1.1, -1).expand(n, V),
        torch.rand(n, V, generator=gen(7), dtype=torch.float64),
    )
    p = torch.softmax(logits, -1)
    counts = torch.bincount(tokens, minlength=V).to(torch.float64)
    assert torch.any((counts - n * p).abs() > Z_MAX * torch.sqrt(n * p * (1 - p)))


def _inverse_cdf_counts(probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    tokens = inverse_cdf(
        probs.expand(n, -1).contiguous(), torch.rand(n, generator=gen(seed), dtype=torch.float64)
    )
    return torch.bincount(tokens, minlength=probs.shape[-1]).to(torch.float64)


@pytest.mark.parametrize("vocab", [3, 64, 131, 300])
def test_inverse_cdf_frequencies_match_probabilities(vocab):
    """Every token, across chunk boundaries (V below, at and above the chunk of 64, and not a
    multiple of it); a zero-probability token (the mask) is never drawn."""
    n = 400_000
    log_q = torch.randn(vocab, generator=gen(20 + vocab)) * 2
    log_q[vocab // 2] = -torch.inf
    p = torch.softmax(log_q.double(), -1)
    counts = _inverse_cdf_counts(log_q.softmax(-1), n, 21 + vocab)
    assert counts[vocab // 2] == 0
    se = torch.sqrt(n * p * (1 - p))
    ok = p > 0
    z = ((counts - n * p).abs() / se)[ok]
    # a Bonferroni-style bound: Z_MAX per token is conservative for up to 300 tokens
    assert torch.all(z <= Z_MAX), f"max z = {z.max():.2f}"


def test_inverse_cdf_frequency_check_has_power():
    """The same tolerance rejects an off-by-one draw inside a chunk (the neighbour's mass)."""
    n = 400_000
    probs = torch.softmax(torch.randn(131, generator=gen(30)) * 2, -1)
    counts = _inverse_cdf_counts(probs, n, 31)
    shifted = torch.roll(counts, 1)  # what returning k + 1 instead of k would give
    p = probs.double()
    se = torch.sqrt(n * p * (1 - p))
    assert torch.all((counts - n * p).abs() <= Z_MAX * se)
    assert torch.any((shifted - n * p).abs() > Z_MAX * se)


def test_inverse_cdf_keeps_tiny_probabilities():
    """A token of probability 1e-3 among tokens of 1e-13 is drawn at its rate, and a token of
    probability 1e-9 after one of probability ~1 keeps its interval (in a one-level float32
    cumulative sum ``1 + 1e-9 == 1``: it could never be drawn)."""
    probs = torch.zeros(1, 128)
    probs[0, 0], probs[0, 77] = 1.0, 1e-9
    total = 1.0 + float(probs[0, 77])
    u = torch.tensor([(1.0 + 0.5 * float(probs[0, 77])) / total], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [77]
    assert inverse_cdf(probs, u - 1e-9).tolist() == [0]
    n = 2_000_000
    log_q = torch.full((128,), -30.0)
    log_q[0], log_q[77] = 0.0, math.log(1e-3)
    probs = torch.softmax(log_q, -1)
    counts = _inverse_cdf_counts(probs, n, 32)
    p = float(probs[77])
    assert abs(counts[77] - n * p) <= Z_MAX * math.sqrt(n * p)
    assert counts.sum() == n


def test_inverse_cdf_matches_a_float64_cumulative_sum():
    """Same draws as ``searchsorted(cumsum(float64 probs), u * total, right=True)``."""
    g = gen(33)
    probs = torch.softmax(torch.randn(5000, 300, generator=g) * 3, -1)
    probs[:, 17] = 0.0
    u = torch.rand(5000, generator=g, dtype=torch.float64)
    cum = probs.double().cumsum(-1)
    expected = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    assert torch.equal(inverse_cdf(probs, u), expected)


def test_inverse_cdf_edges_and_errors():
    # u at the top of [0, 1) with empty trailing chunks: the last token with mass, never a zero
    probs = torch.zeros(2, 200)
    probs[:, 3], probs[:, 70] = 0.25, 0.75
    u = torch.full((2,), 1.0 - 2.0**-53, dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [70, 70]
    assert inverse_cdf(probs, torch.zeros(2, dtype=torch.float64)).tolist() == [3, 3]
    with pytest.raises(ValueError, match="no probability mass"):
        inverse_cdf(torch.zeros(1, 5), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="no probability mass"):
        inverse_cdf(torch.tensor([[0.5, float("nan")]]), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="one uniform per row"):
        inverse_cdf(torch.ones(3, 5), torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[M, V\]"):
        inverse_cdf(torch.ones(5), torch.zeros(1, dtype=torch.float64))
    assert inverse_cdf(torch.ones(0, 5), torch.zeros(0, dtype=torch.float64)).shape == (0,)


def test_sample_categorical_is_reproducible_and_returns_log_q():
    logits = torch.randn(30, 5, V, generator=gen(8))
    a, lqa = sample_categorical(logits, 0.8, 0.9, gen(9), mask_id=MASK)
    b, lqb = sample_categorical(logits, 0.8, 0.9, gen(9), mask_id=MASK)
    assert a.shape == (30, 5) and torch.equal(a, b) and torch.equal(lqa, lqb)
    log_q = proposal_log_probs(logits, 0.8, 0.9, mask_id=MASK)
    assert torch.allclose(lqa, log_q.gather(-1, a.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("temperature, top_p", [(-0.1, 1.0), (1.0, 0.0), (1.0, -0.5), (1.0, 1.5)])
def test_invalid_temperature_or_top_p_raise(temperature, top_p):
    logits = torch.zeros(2, V)
    with pytest.raises(ValueError):
        proposal_log_probs(logits, temperature, top_p)
    with pytest.raises(ValueError):
        sample_categorical(logits, temperature, top_p, gen(0))
    with pytest.raises(ValueError):
        ls.SMCSampler(_tiny(), temperature=temperature, top_p=top_p)


# =========================================================================== unmasking policies
def _state(rows: int, length: int, seed: int, p_masked: float = 0.6) -> torch.Tensor:
    g = gen(seed)
    masked = torch.rand(rows, length, generator=g) < p_masked
    masked[0] = True  # a fully masked row
    masked[1] = False  # a row with nothing left
    return masked


def _inputs(masked: torch.Tensor, seed: int):
    g = gen(seed)
    u = torch.rand(masked.shape, generator=g, dtype=torch.float64)
    confidence = torch.rand(masked.shape, generator=g, dtype=torch.float64)
    return u, confidence


@pytest.mark.parametrize("name", POLICIES)
def test_policies_commit_only_masked_positions(name):
    policy = get_unmasking(name)
    L = 12
    for plan in plan_steps(4, L):
        masked = _state(64, L, seed=plan.index)
        u, confidence = _inputs(masked, seed=100 + plan.index)
        commit = policy.select(masked, plan, u=u, confidence=confidence)
        assert commit.shape == masked.shape and commit.dtype == torch.bool
        assert not torch.any(commit & ~masked)
        assert not torch.any(commit[1])


@pytest.mark.parametrize("name", ["random", "low_confidence"])
def test_even_split_count(name):
    policy = get_unmasking(name)
    L = 13
    for plan in plan_steps(5, L):
        masked = _state(64, L, seed=plan.index)
        u, confidence = _inputs(masked, seed=200 + plan.index)
        commit = policy.select(masked, plan, u=u, confidence=confidence)
        left = plan.steps_in_block - plan.index
        expected = torch.tensor([math.ceil(m / left) for m in masked.sum(-1).tolist()])
        assert torch.equal(commit.sum(-1), expected)


def test_random_positions_follow_u():
    """``random`` takes the masked positions with the largest uniforms (so: uniformly random)."""
    policy = get_unmasking("random")
    plan = plan_steps(4, 12)[1]  # 3 steps left
    masked = _state(64, 12, seed=3)
    u, _ = _inputs(masked, seed=4)
    commit = policy.select(masked, plan, u=u)
    chosen = torch.where(commit, u, torch.inf).amin(-1)
    passed = torch.where(masked & ~commit, u, -torch.inf).amax(-1)
    assert torch.all(chosen >= passed)


def test_random_is_uniform_over_positions():
    """Over many rows, each position of a fully masked row is committed with prob count / L."""
    policy = get_unmasking("random")
    R, L = 5000, 8
    plan = plan_steps(4, L)[0]  # count = 2 of 8
    masked = torch.ones(R, L, dtype=torch.bool)
    u = torch.rand(R, L, generator=gen(5), dtype=torch.float64)
    freq = policy.select(masked, plan, u=u).double().mean(0)
    p = 2 / L
    assert torch.all((freq - p).abs() <= Z_MAX * math.sqrt(p * (1 - p) / R))


def test_low_confidence_picks_most_confident():
    policy = get_unmasking("low_confidence")
    L = 12
    for plan in plan_steps(4, L):
        masked = _state(64, L, seed=10 + plan.index)
        _, confidence = _inputs(masked, seed=20 + plan.index)
        commit = policy.select(masked, plan, confidence=confidence)
        least_chosen = torch.where(commit, confidence, torch.inf).amin(-1)
        best_left = torch.where(masked & ~commit, confidence, -torch.inf).amax(-1)
        assert torch.all(least_chosen > best_left)


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
def test_threshold_policy(threshold):
    policy = get_unmasking("threshold", threshold=threshold)
    L = 12
    plans = plan_steps(8, L, block_length=6)  # 2 blocks of 4 steps
    for plan in plans:
        masked = torch.zeros(64, L, dtype=torch.bool)
        masked[:, plan.block_start : plan.block_end] = _state(
            64, plan.block_end - plan.block_start, seed=plan.step
        )
        _, confidence = _inputs(masked, seed=300 + plan.step)
        commit = policy.select(masked, plan, confidence=confidence)
        assert not torch.any(commit & ~masked)
        if plan.closes_block:
            assert torch.equal(commit, masked)
            continue
        above = masked & (confidence >= threshold)
        assert torch.all(commit[above])
        has_any = masked.any(-1)
        assert torch.equal(commit.any(-1), has_any), "at least one position when any is masked"
        # below-threshold commits happen only as the single most confident fallback
        below = commit & ~above
        assert torch.all(below.sum(-1) <= 1)
        fallback_rows = below.any(-1)
        assert not torch.any(above[fallback_rows].any(-1))
        best = torch.where(masked, confidence, -torch.inf).argmax(-1)
        assert torch.all(below[fallback_rows].float().argmax(-1) == best[fallback_rows])


def test_threshold_rejects_bad_values():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            get_unmasking("threshold", threshold=bad)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ancestral_fraction_and_last_step(schedule):
    policy = get_unmasking("ancestral", schedule=schedule)
    sched = get_schedule(schedule)
    R, L = 4000, 8
    masked = torch.ones(R, L, dtype=torch.bool)
    plans = plan_steps(4, L)
    for plan in plans:
        u = torch.rand(R, L, generator=gen(plan.index), dtype=torch.float64)
        commit = policy.select(masked, plan, u=u)
        assert not torch.any(commit & ~masked)
        if plan.closes_block:
            assert torch.equal(commit, masked)
            continue
        p = sched.unmask_probability(
            torch.tensor(plan.t, dtype=torch.float64), torch.tensor(plan.s, dtype=torch.float64)
        ).item()
        n = R * L
        frac = commit.double().mean().item()
        assert abs(frac - p) <= Z_MAX * math.sqrt(p * (1 - p) / n), (plan.index, frac, p)
    # partially masked rows: never commits clean positions, everything on the last step
    partial = _state(64, L, seed=9)
    assert torch.equal(
        policy.select(
            partial, plans[-1], u=torch.rand(64, L, generator=gen(1), dtype=torch.float64)
        ),
        partial,
    )


@pytest.mark.parametrize("block_length", [None, 3, 5])
@pytest.mark.parametrize("name", POLICIES)
def test_policy_run_clears_every_block(name, block_length):
    """Driving a policy through its plan (state-based) unmasks each block by its last step."""
    policy = get_unmasking(name)
    R, L, start = 32, 10, 2
    plans = plan_steps(
        8 if block_length is None else 3 * math.ceil((L - start) / block_length),
        L,
        start,
        block_length,
    )
    x_masked = torch.zeros(R, L, dtype=torch.bool)
    x_masked[:, start:] = True
    g = gen(11)
    for plan in plans:
        in_block = torch.zeros_like(x_masked)
        in_block[:, plan.block_start : plan.block_end] = True
        masked = x_masked & in_block
        if plan.opens_block:
            assert masked[:, plan.block_start : plan.block_end].all(), "a block starts fully masked"
            assert not x_masked[:, : plan.block_start].any(), "earlier blocks are finished"
        u = torch.rand(R, L, generator=g, dtype=torch.float64)
        confidence = torch.rand(R, L, generator=g, dtype=torch.float64)
        commit = policy.select(masked, plan, u=u, confidence=confidence)
        assert not torch.any(commit & ~masked)
        x_masked &= ~commit
        if plan.closes_block:
            assert not x_masked[:, plan.block_start : plan.block_end].any()
    assert not x_masked.any()


def test_get_unmasking_by_name_object_and_error():
    for name, cls in UNMASKING_POLICIES.items():
        assert isinstance(get_unmasking(name), cls)
    policy = get_unmasking("threshold", threshold=0.5)
    assert policy.threshold == 0.5
    assert get_unmasking(policy) is policy
    with pytest.raises(ValueError, match="nope") as err:
        get_unmasking("nope")
    for name in UNMASKING_POLICIES:
        assert name in str(err.value)


# =========================================================================== plan_steps
def test_plan_steps_single_block():
    plans = plan_steps(4, 10, start=3)
    assert [p.step for p in plans] == [0, 1, 2, 3]
    assert all((p.block_start, p.block_end) == (3, 10) for p in plans)
    assert [p.index for p in plans] == [0, 1, 2, 3]
    assert plans[0].t == 1.0 and plans[-1].s == 0.0
    assert all(p.t > p.s for p in plans)
    assert all(p.num_steps == 4 and p.steps_in_block == 4 for p in plans)
    assert plans[0].opens_block and plans[-1].closes_block
    assert not any(p.closes_block for p in plans[:-1])


@pytest.mark.parametrize(
    "num_steps, seq_len, start, block_length",
    [(6, 10, 2, 3), (8, 16, 0, 4), (4, 16, 0, 4), (9, 11, 4, 3), (5, 7, 0, 10), (12, 12, 6, 2)],
)
def test_plan_steps_blocks_tile_and_split_evenly(num_steps, seq_len, start, block_length):
    plans = plan_steps(num_steps, seq_len, start, block_length)
    assert [p.step for p in plans] == list(range(num_steps))
    blocks = []
    for p in plans:
        if not blocks or blocks[-1][:2] != (p.block_start, p.block_end):
            blocks.append((p.block_start, p.block_end, []))
        blocks[-1][2].append(p)
    num_blocks = math.ceil((seq_len - start) / block_length)
    assert len(blocks) == num_blocks
    # the blocks tile [start, seq_len) in order, each at most block_length long
    assert blocks[0][0] == start and blocks[-1][1] == seq_len
    for (_, hi, _), (lo, _, _) in zip(blocks, blocks[1:], strict=False):
        assert hi == lo
    assert all(0 < hi - lo <= block_length for lo, hi, _ in blocks)
    # steps shared equally; each block's local times go from 1 down to 0
    per_block = num_steps // num_blocks
    for _, _, steps in blocks:
        assert len(steps) == per_block
        assert [p.index for p in steps] == list(range(per_block))
        assert steps[0].opens_block and steps[0].t == 1.0
        assert steps[-1].closes_block and steps[-1].s == 0.0


def test_plan_steps_errors():
    with pytest.raises(ValueError, match=r"multiple of the number of blocks") as err:
        plan_steps(5, 16, 0, block_length=4)  # 4 blocks
    assert "num_steps=5" in str(err.value) and "4 blocks" in str(err.value)
    with pytest.raises(ValueError, match="num_steps"):
        plan_steps(0, 8)
    with pytest.raises(ValueError):
        plan_steps(4, 8, start=8)
    with pytest.raises(ValueError, match="block_length"):
        plan_steps(4, 8, block_length=0)


# =========================================================================== sampler invariants
VOCAB, MAX_LEN = 12, 16


def _tiny() -> ls.TinyTransformerDenoiser:
    torch.manual_seed(0)
    return ls.TinyTransformerDenoiser(vocab_size=VOCAB, max_len=MAX_LEN).eval()


class Recorder:
    """A denoiser wrapper that records every ``x_t`` it receives."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.vocab_size = denoiser.vocab_size
        self.mask_id = denoiser.mask_id
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x_t, t, cond=None):
        self.inputs.append(x_t.clone())
        return self.denoiser(x_t, t, cond)


SAMPLER_CASES = [
    (policy, block_length, prompt_len)
    for policy in POLICIES
    for block_length in (None, 4)
    for prompt_len in (0, 4)
]


def _sample(denoiser, policy, block_length, prompt_len, num_particles, seed, **kwargs):
    L, B = 12, 2
    blocks = 1 if block_length is None else math.ceil((L - prompt_len) / block_length)
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=num_particles,
        num_steps=4 * blocks,
        unmasking=policy,
        block_length=block_length,
        **kwargs,
    )
    prompt = (
        torch.randint(0, VOCAB - 1, (B, prompt_len), generator=gen(seed + 1))
        if prompt_len
        else None
    )
    out = sampler.sample(seq_len=L, batch_size=B, prompt=prompt, generator=gen(seed))
    return out, prompt


@pytest.mark.parametrize("policy, block_length, prompt_len", SAMPLER_CASES)
def test_sampler_outputs_have_no_mask_and_keep_prompt(policy, block_length, prompt_len):
    denoiser = _tiny()
    for kwargs in (
        {},
        {"temperature": 0.0},
        {"temperature": 0.7, "top_p": 0.5},
        {"potential": ls.SelfReward()},
    ):
        out, prompt = _sample(denoiser, policy, block_length, prompt_len, 3, seed=1, **kwargs)
        assert out.tokens.shape == (2, 3, 12)
        assert out.tokens.dtype == torch.long
        assert not torch.any(out.tokens == denoiser.mask_id)
        assert torch.all((out.tokens >= 0) & (out.tokens < VOCAB))
        if prompt is not None:
            assert torch.equal(out.tokens[:, :, :prompt_len], prompt.unsqueeze(1).expand(-1, 3, -1))


@pytest.mark.parametrize("policy, block_length, prompt_len", SAMPLER_CASES)
def test_sampler_clean_tokens_never_change(policy, block_length, prompt_len):
    recorder = Recorder(_tiny())
    out, prompt = _sample(
        recorder, policy, block_length, prompt_len, 1, seed=2, confidence_threshold=0.12
    )
    states = [*recorder.inputs, out.tokens[:, 0]]
    assert len(states) >= 3
    mask_id = recorder.mask_id
    assert torch.all(states[0][:, prompt_len:] == mask_id), "sampling starts fully masked"
    for before, after in zip(states, states[1:], strict=False):
        clean = before != mask_id
        assert torch.equal(after[clean], before[clean]), "a clean token changed"
        assert (after == mask_id).sum() <= (before == mask_id).sum()
    if prompt is not None:
        for x in states:
            assert torch.equal(x[:, :prompt_len], prompt)
    # the check above is not vacuous: the run ends clean and some intermediate input already
    # held generated tokens
    assert not torch.any(states[-1] == mask_id)
    assert any((x[:, prompt_len:] != mask_id).any() for x in states[1:-1])


@pytest.mark.parametrize("policy", POLICIES)
def test_sampler_block_order(policy):
    """With blocks, positions of later blocks stay masked until earlier blocks are done."""
    recorder = Recorder(_tiny())
    _sample(recorder, policy, 4, 0, 1, seed=3)
    mask_id = recorder.mask_id
    for x in recorder.inputs:
        masked = x == mask_id
        for lo in (4, 8):
            later_started = (~masked[:, lo:]).any(-1)
            assert not torch.any(later_started & masked[:, :lo].any(-1))


def test_prompt_mask_entries_are_generated():
    denoiser = _tiny()
    mask_id = denoiser.mask_id
    prompt = torch.tensor([[1, mask_id, 2], [mask_id, 4, 5]])
    sampler = ls.SMCSampler(denoiser, num_particles=2, num_steps=4, unmasking="random")
    out = sampler.sample(seq_len=8, prompt=prompt, generator=gen(0), infill=True)
    assert not torch.any(out.tokens == mask_id)
    fixed = prompt != mask_id
    assert torch.equal(
        out.tokens[:, :, :3][fixed.unsqueeze(1).expand(-1, 2, -1)],
        prompt.unsqueeze(1).expand(-1, 2, -1)[fixed.unsqueeze(1).expand(-1, 2, -1)],
    )
