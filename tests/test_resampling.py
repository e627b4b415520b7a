"""Pure SMC numerics (``lightning_smc.smc``): resampling schemes, weights, strategies, seeding.

Statistical checks compare an empirical mean over ``S`` independent rows with its expectation
within ``Z_MAX`` empirical standard errors (``std / sqrt(S)``); where the empirical variance is
zero (a scheme that is deterministic for that particle) the mean must equal the expectation
within ``EXACT_TOL``. Every test uses fixed seeds.
"""

import math

import pytest
import torch

from lightning_smc.smc import (
    RESAMPLING_SCHEMES,
    Always,
    AtBlockBoundaries,
    ESSBelow,
    EveryK,
    Never,
    RowGenerators,
    StepInfo,
    derive_seed,
    ess,
    get_resampling,
    get_strategy,
    log_mean_exp,
    normalize,
    rand_at,
)
from lightning_smc.smc.resampling import _inverse_cdf

SCHEMES = sorted(RESAMPLING_SCHEMES)
Z_MAX = 5.0
EXACT_TOL = 1e-9
S = 4000  # independent rows for the statistical checks
N = 10

# A fixed, clearly non-uniform weight vector (no M * W_i lands on an integer for M in {7, 10, 13}).
LOG_W = torch.log(
    torch.tensor(
        [0.31, 0.02, 0.17, 0.005, 0.095, 0.12, 0.04, 0.11, 0.035, 0.095], dtype=torch.float64
    )
)
F_VALUES = torch.tensor([1.5, -2.0, 0.3, 7.0, -0.7, 2.2, 4.1, -3.3, 0.0, 1.1], dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_mean_matches(samples: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``samples [S, ...]``: the mean over dim 0 equals ``expected`` within Z_MAX standard errors."""
    rows = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0, unbiased=True) / math.sqrt(rows)
    err = (mean - expected).abs()
    exact = se == 0
    assert torch.all(err[exact] <= EXACT_TOL), f"{what}: zero-variance entries off: {err[exact]}"
    z = err[~exact] / se[~exact]
    assert torch.all(z <= Z_MAX), (
        f"{what}: z-scores {z.tolist()} (mean {mean}, expected {expected})"
    )


def test_registry_has_the_four_documented_schemes():
    assert {"multinomial", "stratified", "systematic", "residual"} <= set(RESAMPLING_SCHEMES)


# --------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("M", [7, 10, 13])
@pytest.mark.parametrize("name", SCHEMES)
def test_offspring_counts_are_unbiased(name, M):
    W = torch.softmax(LOG_W, -1)
    ancestors = get_resampling(name)(LOG_W.expand(S, N), M, gen(0))
    assert ancestors.shape == (S, M)
    counts = torch.nn.functional.one_hot(ancestors, N).sum(1).to(torch.float64)  # [S, N]
    assert torch.all(counts.sum(-1) == M)
    assert_mean_matches(counts, M * W, f"{name}: offspring counts")


@pytest.mark.parametrize("M", [7, 10, 13])
@pytest.mark.parametrize("name", SCHEMES)
def test_test_function_mean_is_unbiased(name, M):
    W = torch.softmax(LOG_W, -1)
    ancestors = get_resampling(name)(LOG_W.expand(S, N), M, gen(1))
    per_row = F_VALUES[ancestors].mean(-1)  # [S]
    assert_mean_matches(per_row.unsqueeze(-1), (W * F_VALUES).sum().unsqueeze(0), f"{name}: E[f]")


def test_moment_check_has_power():
    """The tolerance rejects a scheme that ignores the weights (uniform ancestors)."""
    W = torch.softmax(LOG_W, -1)
    uniform = torch.randint(0, N, (S, N), generator=gen(2))
    counts = torch.nn.functional.one_hot(uniform, N).sum(1).to(torch.float64)
    with pytest.raises(AssertionError):
        assert_mean_matches(counts, N * W, "uniform")


# --------------------------------------------------------------------------- zero weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zeros", [[N - 1], [0], [4], [0, 3, N - 1], [N - 2, N - 1]])
@pytest.mark.parametrize("name", SCHEMES)
def test_zero_weight_particles_are_never_drawn(name, zeros, dtype):
    g = gen(3)
    log_w = torch.randn(2000, N, generator=g, dtype=torch.float64).to(dtype)
    log_w[:, zeros] = -torch.inf
    for M in (N, 2 * N + 1):
        ancestors = get_resampling(name)(log_w, M, g)
        assert ancestors.dtype == torch.long
        assert ancestors.min() >= 0 and ancestors.max() < N
        assert not torch.isin(ancestors, torch.tensor(zeros)).any(), (
            f"{name} drew a zero-weight particle"
        )
        assert set(ancestors.unique().tolist()) == set(range(N)) - set(zeros)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alive", [0, 5, N - 1])
@pytest.mark.parametrize("name", SCHEMES)
def test_single_surviving_particle_takes_every_slot(name, alive, dtype):
    log_w = torch.full((500, N), -torch.inf, dtype=dtype)
    log_w[:, alive] = -3.0
    ancestors = get_resampling(name)(log_w, N + 3, gen(4))
    assert torch.all(ancestors == alive)


@pytest.mark.parametrize("name", SCHEMES)
def test_float32_weights_summing_below_one_give_valid_indices(name):
    # float32 weights whose float32 CDF ends just below 1, passed as float32 log-weights;
    # the last particle has zero weight.
    W32 = torch.tensor([0.25, 0.25, 0.25, 0.2499999, 0.0], dtype=torch.float32)
    assert W32.cumsum(0)[-1] < 1.0
    log_w = torch.log(W32).expand(3000, -1)
    ancestors = get_resampling(name)(log_w, 9, gen(5))
    assert ancestors.min() >= 0 and ancestors.max() < 4


def test_inverse_cdf_with_u_close_to_one_and_cdf_below_one():
    top_u = [0.0, 0.6, 1 - 1e-12, 1 - 2**-53]
    u = torch.tensor(top_u, dtype=torch.float64)
    # float32 weights: CDF ends below 1, last entry zero.
    W32 = torch.tensor([0.25, 0.25, 0.25, 0.2499999, 0.0], dtype=torch.float32)
    assert W32.cumsum(0)[-1] < 1.0
    for W in (W32, W32.to(torch.float64)):
        idx = _inverse_cdf(W, u)
        assert idx.dtype == torch.long
        assert idx.tolist() == [0, 2, 3, 3]
    # "float32-like" weights stored in float64 whose sum is < 1 (no zero weight at the end).
    W = torch.full((100,), 0.01, dtype=torch.float32).to(torch.float64)
    assert W.sum() < 1.0
    idx = _inverse_cdf(W, torch.tensor([0.0, 0.505, 1 - 1e-12, 1 - 2**-53], dtype=torch.float64))
    assert idx.tolist() == [0, 50, 99, 99]
    # batched: leading dimensions and a zero-weight particle in the middle are skipped
    W = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    uu = torch.tensor([[0.0, 0.5, 1 - 1e-12], [0.0, 0.5, 1 - 1e-12]], dtype=torch.float64)
    assert _inverse_cdf(W, uu).tolist() == [[0, 2, 2], [2, 2, 2]]


def test_inverse_cdf_u_equal_one_is_clamped_to_last_positive():
    """``(j + V) / M`` can round to exactly 1.0 in float64 (e.g. M=3, V=1-2**-53); the result
    must still be a valid index with positive weight."""
    j, v, m = 2.0, 1 - 2**-53, 3
    assert (j + v) / m == 1.0  # the rounding really happens
    W = torch.tensor([[0.2, 0.3, 0.5, 0.0, 0.0], [0.2, 0.3, 0.0, 0.5, 0.0]], dtype=torch.float64)
    u = torch.ones(2, 1, dtype=torch.float64)
    assert _inverse_cdf(W, u).tolist() == [[2], [3]]


@pytest.mark.parametrize("name", SCHEMES)
def test_rows_without_finite_weight_raise(name):
    log_w = torch.zeros(3, 4, dtype=torch.float64)
    log_w[1] = -torch.inf
    with pytest.raises(ValueError):
        get_resampling(name)(log_w, 4, gen(0))
    log_w[1] = torch.nan
    with pytest.raises(ValueError):
        get_resampling(name)(log_w, 4, gen(0))


# --------------------------------------------------------------------------- shapes, determinism
@pytest.mark.parametrize("M", [3, 8, 11])
@pytest.mark.parametrize("name", SCHEMES)
def test_batched_shapes(name, M):
    log_w = torch.randn(2, 3, 8, generator=gen(6), dtype=torch.float64)
    ancestors = get_resampling(name)(log_w, M, gen(7))
    assert ancestors.shape == (2, 3, M)
    assert ancestors.dtype == torch.long
    assert ancestors.min() >= 0 and ancestors.max() < 8


@pytest.mark.parametrize("name", SCHEMES)
def test_batched_rows_use_their_own_weights(name):
    """Each leading row is resampled with its own weights (a one-hot row only draws its particle)."""
    log_w = torch.full((2, 3, 6), -torch.inf, dtype=torch.float64)
    for a in range(2):
        for b in range(3):
            log_w[a, b, (a * 3 + b) % 6] = 0.0
    ancestors = get_resampling(name)(log_w, 4, gen(8))
    expected = torch.tensor([[(a * 3 + b) % 6 for b in range(3)] for a in range(2)])
    assert torch.all(ancestors == expected.unsqueeze(-1))


@pytest.mark.parametrize("name", SCHEMES)
def test_same_seed_gives_identical_ancestors(name):
    log_w = torch.randn(50, N, generator=gen(9), dtype=torch.float64)
    scheme = get_resampling(name)
    a = scheme(log_w, N, gen(123))
    b = scheme(log_w, N, gen(123))
    assert torch.equal(a, b)


def test_multinomial_different_seeds_differ():
    log_w = torch.randn(50, N, generator=gen(10), dtype=torch.float64)
    scheme = get_resampling("multinomial")
    assert not torch.equal(scheme(log_w, N, gen(1)), scheme(log_w, N, gen(2)))


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ValueError, match="nope") as err:
        get_resampling("nope")
    for name in RESAMPLING_SCHEMES:
        assert name in str(err.value)


def test_get_resampling_by_name_and_callable():
    for name, fn in RESAMPLING_SCHEMES.items():
        assert get_resampling(name) is fn

    def custom(log_w, m, generator=None):
        return torch.zeros(*log_w.shape[:-1], m, dtype=torch.long)

    assert get_resampling(custom) is custom


# --------------------------------------------------------------------------- weights
def test_normalize_and_log_mean_exp():
    log_w = torch.tensor(
        [[0.0, 1.0, -2.0, 500.0], [-1e3, -1e3 + 1.0, -1e3 - 2.0, -torch.inf]], dtype=torch.float64
    )
    log_W = normalize(log_w)
    assert torch.allclose(
        torch.logsumexp(log_W, -1), torch.zeros(2, dtype=torch.float64), atol=1e-12
    )
    assert torch.isneginf(log_W[1, 3])
    # shift invariance and the value on a moderate row
    row = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    expected = torch.log(torch.exp(row).mean())
    assert torch.allclose(log_mean_exp(row), expected, atol=1e-12)
    assert torch.allclose(log_mean_exp(row + 1000.0), expected + 1000.0, atol=1e-9)
    assert torch.allclose(normalize(row + 1000.0), normalize(row), atol=1e-12)
    # the particle axis can be chosen
    m = torch.randn(3, 5, generator=gen(11), dtype=torch.float64)
    assert torch.allclose(log_mean_exp(m, dim=0), torch.log(torch.exp(m).mean(0)), atol=1e-12)
    assert torch.allclose(
        torch.logsumexp(normalize(m, dim=0), 0), torch.zeros(5, dtype=torch.float64), atol=1e-12
    )


def test_ess_bounds_and_values():
    n = 7
    assert torch.allclose(
        ess(torch.zeros(n, dtype=torch.float64)), torch.tensor(float(n), dtype=torch.float64)
    )
    assert torch.allclose(
        ess(torch.full((n,), -123.4, dtype=torch.float64)),
        torch.tensor(float(n), dtype=torch.float64),
    )
    one_hot = torch.full((n,), -torch.inf, dtype=torch.float64)
    one_hot[3] = 0.0
    assert torch.allclose(ess(one_hot), torch.tensor(1.0, dtype=torch.float64))
    two = torch.tensor([0.0, 0.0, -torch.inf], dtype=torch.float64)
    assert torch.allclose(ess(two), torch.tensor(2.0, dtype=torch.float64))
    # closed form 1 / sum W^2 on random rows, and 1 <= ESS <= N
    log_w = torch.randn(20, n, generator=gen(12), dtype=torch.float64) * 3
    W = torch.softmax(log_w, -1)
    e = ess(log_w)
    assert e.shape == (20,)
    assert torch.allclose(e, 1.0 / (W**2).sum(-1), rtol=1e-10)
    assert torch.all(e >= 1.0 - 1e-12) and torch.all(e <= n + 1e-9)


# --------------------------------------------------------------------------- strategies
def test_get_strategy_parses_specs():
    assert isinstance(get_strategy("always"), Always)
    assert isinstance(get_strategy("never"), Never)
    assert get_strategy("every:3") == EveryK(3)
    assert get_strategy("ess:0.5") == ESSBelow(0.5)
    assert get_strategy("ess:0.25") == ESSBelow(0.25)
    assert get_strategy("block") == AtBlockBoundaries(None)
    assert get_strategy("block:0.5") == AtBlockBoundaries(0.5)
    obj = EveryK(5)
    assert get_strategy(obj) is obj


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        "every:x",
        "every:0",
        "every:",
        "ess:2",
        "ess:0",
        "ess:abc",
        "block:0",
        "block:1.5",
        "always:1",
        "never:2",
    ],
)
def test_get_strategy_bad_spec_names_it(spec):
    with pytest.raises(ValueError) as err:
        get_strategy(spec)
    assert repr(spec) in str(err.value)


def test_always_and_never_shapes():
    log_w = torch.zeros(2, 3, 4, dtype=torch.float64)
    info = StepInfo(step=1, num_steps=5)
    a, n = Always()(log_w, info), Never()(log_w, info)
    assert a.shape == n.shape == (2, 3)
    assert a.dtype == n.dtype == torch.bool
    assert a.all() and not n.any()


def test_every_k_fires_at_multiples():
    log_w = torch.zeros(2, 4, dtype=torch.float64)
    strategy = get_strategy("every:3")
    fired = [k for k in range(1, 12) if strategy(log_w, StepInfo(k, 12)).all()]
    assert fired == [3, 6, 9]
    for k in range(1, 12):
        out = strategy(log_w, StepInfo(k, 12))
        assert out.shape == (2,) and (out.all() or not out.any())


def test_ess_below_decides_per_row():
    log_w = torch.zeros(3, 4, dtype=torch.float64)
    log_w[1] = torch.tensor([0.0, -torch.inf, -torch.inf, -torch.inf])  # ESS 1
    log_w[2] = torch.tensor([0.0, 0.0, 0.0, -torch.inf])  # ESS 3 = 0.75 N
    info = StepInfo(2, 5)
    assert get_strategy("ess:0.5")(log_w, info).tolist() == [False, True, False]
    assert get_strategy("ess:0.9")(log_w, info).tolist() == [False, True, True]
    assert ESSBelow()(log_w, info).tolist() == [False, True, False]  # default fraction 0.5


def test_at_block_boundaries_only_at_block_start():
    log_w = torch.zeros(2, 4, dtype=torch.float64)
    log_w[1] = torch.tensor([0.0, -torch.inf, -torch.inf, -torch.inf])
    block, block_ess = get_strategy("block"), get_strategy("block:0.5")
    inside, start = StepInfo(3, 8, block_start=False), StepInfo(4, 8, block_start=True)
    assert block(log_w, inside).tolist() == [False, False]
    assert block(log_w, start).tolist() == [True, True]
    assert block_ess(log_w, inside).tolist() == [False, False]
    assert block_ess(log_w, start).tolist() == [False, True]


# --------------------------------------------------------------------------- seeding
def test_derive_seed_deterministic_in_range_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    values = []
    for seed in (0, 1, 12345, 2**64 - 1):
        for keys in [(), (0,), (1,), (0, 0), (0, 1), (1, 0), (7, 3, 9)]:
            s = derive_seed(seed, *keys)
            assert isinstance(s, int)
            assert 0 <= s < 2**63
            values.append(s)
    assert len(set(values)) == len(values), "derive_seed collided on distinct inputs"
    many = {derive_seed(42, k) for k in range(10_000)}
    assert len(many) == 10_000
    # key order matters
    assert derive_seed(5, 1, 2) != derive_seed(5, 2, 1)


def test_row_generators_split_is_reproducible():
    a = RowGenerators.split(gen(7), 3)
    b = RowGenerators.split(gen(7), 3)
    c = RowGenerators.split(gen(8), 3)
    assert len(a) == 3
    xa, xb, xc = a.rand((4, 5), "cpu"), b.rand((4, 5), "cpu"), c.rand((4, 5), "cpu")
    assert xa.shape == (3, 4, 5) and xa.dtype == torch.float64
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)
    assert not torch.equal(xa[0], xa[1]), "rows must have distinct streams"
    assert torch.all((xa >= 0) & (xa < 1))


def test_row_generators_from_seeds_and_empty():
    rows = RowGenerators.from_seeds([derive_seed(0, 0), derive_seed(0, 1)])
    direct = torch.rand(6, generator=gen(derive_seed(0, 1)), dtype=torch.float64)
    assert torch.equal(rows.rand_row(1, (6,), "cpu"), direct)
    with pytest.raises(ValueError):
        RowGenerators([])


def test_rand_at_rows_do_not_depend_on_other_rows_masks():
    g = gen(0)
    mask_a = torch.rand(3, 4, 5, generator=g) < 0.5
    mask_b = mask_a.clone()
    mask_b[0] = ~mask_b[0]  # change row 0 only (a different count too)
    mask_b[2, 0, 0] = ~mask_b[2, 0, 0]  # and row 2
    assert mask_a[0].sum() != mask_b[0].sum()
    seeds = [11, 22, 33]
    ua = rand_at(RowGenerators.from_seeds(seeds), mask_a, (2,))
    ub = rand_at(RowGenerators.from_seeds(seeds), mask_b, (2,))
    assert ua.shape == (int(mask_a.sum()), 2) and ub.shape == (int(mask_b.sum()), 2)
    assert ua.dtype == torch.float64
    # row-major order: the entries of row 1 sit after row 0's, in both
    ca, cb = mask_a.flatten(1).sum(-1).tolist(), mask_b.flatten(1).sum(-1).tolist()
    row1_a = ua[ca[0] : ca[0] + ca[1]]
    row1_b = ub[cb[0] : cb[0] + cb[1]]
    assert torch.equal(row1_a, row1_b)
    # a row's draws are the first draws of its own generator
    expected = torch.rand((ca[1], 2), generator=gen(22), dtype=torch.float64)
    assert torch.equal(row1_a, expected)


def test_rand_at_empty_mask():
    rows = RowGenerators.from_seeds([1, 2])
    out = rand_at(rows, torch.zeros(2, 3, dtype=torch.bool), (4,))
    assert out.shape == (0, 4)
