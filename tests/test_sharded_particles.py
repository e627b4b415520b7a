"""Particles sharded over ranks (``layout=ParticleShards()``): global resampling, exact targets.

Two ranks are spawned once per module (CPU, gloo, a ``FileStore`` rendezvous) and run the
scenario functions below on request (``_Ranks.run``, bounded by a timeout). On the enumerable
toy of ``exact.py`` the sharded sampler hits the exact target with ``E[Ẑ] = Z`` (tolerance as in
``test_exact_targets.py``) and agrees with single-process SMC; a rank holding all the weight
sends its particle to the other rank; exactly the particles whose ancestor lives on another
rank travel, once per destination; one rank in the sharded layout is bit-identical to the local
layout; and breaking the sharded weights (wrong slot order in the all-gather, or no exchange)
makes the exact check fail.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import queue
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from exact import L, estimate, max_z_score, toy_joint, z_of_normalizer

import lightning_smc as ls
from lightning_smc.sampler import SMCSampler
from lightning_smc.sampling.layouts import get_layout

ROOT = Path(__file__).resolve().parents[1]
Z_MAX = 4.5  # as in test_exact_targets.py
B, N = 3000, 8
WORLD = 2
ALPHA = 0.5


def reward_fn(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


# --------------------------------------------------------------------------- two ranks


def _worker(rank: int, store_path: str, tasks, results) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    while (task := tasks.get()) is not None:
        name, kwargs = task
        try:
            buffer = io.BytesIO()
            torch.save(globals()[name](**kwargs), buffer)
            results.put((rank, True, buffer.getvalue()))
        except Exception:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Ranks:
    """``WORLD`` spawned processes in one gloo group; ``run(fn, **kw)`` -> each rank's result."""

    def __init__(self, directory: Path):
        self.directory, self.generation, self.procs = directory, 0, []

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.generation += 1
        store = str(self.directory / f"store-{self.generation}")
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, store, self.tasks[r], self.results), daemon=True)
            for r in range(WORLD)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, timeout: float = 45.0, **kwargs) -> list:
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for q in self.tasks:
            q.put((fn.__name__, kwargs))
        deadline, got = time.monotonic() + timeout, {}
        try:
            while len(got) < WORLD:
                rank, ok, payload = self.results.get(timeout=max(deadline - time.monotonic(), 0))
                got[rank] = (ok, payload)
                if not ok:  # the other rank may now wait forever in a collective
                    deadline = min(deadline, time.monotonic() + 5.0)
        except queue.Empty:
            self.close()  # a rank may hang in a collective: start afresh next time
        errors = [payload for ok, payload in got.values() if not ok]
        if errors:
            raise RuntimeError("a rank failed:\n" + errors[0])
        if len(got) < WORLD:
            pytest.fail(f"{fn.__name__} did not finish on {WORLD} ranks within {timeout} s")
        return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(WORLD)]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        self.procs = []


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pool = _Ranks(tmp_path_factory.mktemp("ranks"))
    yield pool
    for q in getattr(pool, "tasks", []):
        q.put(None)
    for p in pool.procs:
        p.join(timeout=10)
    pool.close()


@pytest.fixture
def world_of_one():
    """A one-rank process group in this process (destroyed afterwards)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# --------------------------------------------------------------------------- scenarios


def _problem(potential: str):
    """``(denoiser, sampler kwargs, target, Z, wrong target)`` of an exact problem."""
    if potential == "self-reward":
        p0 = toy_joint(1).flatten()
        # multinomial ancestors cross ranks often (systematic ones mostly stay in place)
        kwargs = dict(potential=ls.SelfReward(), resample_when="always", resampling="multinomial")
        target, wrong = p0**2, p0
    else:
        p0 = toy_joint(3).flatten()
        tilt = ls.RewardTilt(reward_fn, alpha=ALPHA, schedule="linear", num_samples=1)
        kwargs = dict(potential=tilt, ess_threshold=0.9)
        target = p0 * torch.exp(reward_fn(ls.ExactDenoiser(p0.view((3,) * L)).states) / ALPHA)
        wrong = p0
    return ls.ExactDenoiser(p0.view((3,) * L)), kwargs, target, float(target.sum()), wrong


def _summary(out: ls.SMCOutput, layout=None) -> dict:
    keys = ("tokens", "log_weights", "log_normalizer", "ess", "resampled", "ancestors")
    result = {k: getattr(out, k) for k in keys}
    result["nfe"] = out.nfe
    if isinstance(layout, ls.ParticleShards):
        result["sent"], result["received"] = layout.rows_sent, layout.rows_received
    return result


def sample_exact(
    potential: str, seed: int = 0, layout="sharded", batch: int = B, steps: int = L, **extra
) -> dict:
    denoiser, kwargs, *_ = _problem(potential)
    layout = get_layout(layout)
    sampler = SMCSampler(
        denoiser,
        num_particles=N,
        num_steps=steps,
        unmasking="random",
        layout=layout,
        **kwargs,
        **extra,
    )
    out = sampler.sample(L, batch_size=batch, generator=torch.Generator().manual_seed(seed))
    return _summary(out, layout)


class _OneParticleWins(ls.Potential):
    """At step 1 all the weight goes to rank 1's first particle of each prompt (global slot n)."""

    def twist(self, ctx, base_lp):
        R = ctx.x_t.shape[0]
        log_g = torch.zeros(R, dtype=torch.float64)
        if ctx.plan.step == 1:
            self.before = ctx.x_t.clone()
            log_g -= 40.0
            if dist.get_rank() == 1:
                log_g.view(-1, ctx.num_particles)[:, 0] = 0.0
        return log_g


class _Recorder(ls.Proposal):
    """The base kernel, recording the (resampled) state of step 1."""

    def __call__(self, ctx, base_lp):
        if ctx.plan.step == 1:
            self.after = ctx.x_t.clone()
        return base_lp


def one_particle_wins(batch: int = 3, particles: int = 4, subgroup: bool = False) -> dict:
    torch.manual_seed(0)
    denoiser = ls.TinyTransformerDenoiser(vocab_size=12, max_len=8, d_model=16, n_layers=1)
    group = dist.new_group(list(range(WORLD))) if subgroup else None
    potential, recorder, layout = _OneParticleWins(), _Recorder(), ls.ParticleShards(group)
    sampler = SMCSampler(
        denoiser.eval(),
        num_particles=particles,
        num_steps=8,
        unmasking="random",
        potential=potential,
        proposal=recorder,
        resample_when="always",
        layout=layout,
    )
    out = sampler.sample(8, batch_size=batch, generator=torch.Generator().manual_seed(1))
    return dict(
        _summary(out, layout), before=potential.before, after=recorder.after, rank=layout.rank
    )


def expect_error(**sampler_kwargs) -> str:
    sample_kwargs = sampler_kwargs.pop("sample", {})
    sampler = SMCSampler(ls.ExactDenoiser(toy_joint(0)), num_steps=L, **sampler_kwargs)
    try:
        sampler.sample(L, batch_size=2, **sample_kwargs)
    except (ValueError, RuntimeError) as err:
        return str(err)
    return "no error"


def seeded_by_rank() -> str:
    seed = dist.get_rank()
    return expect_error(
        num_particles=4,
        layout="sharded",
        sample=dict(generator=torch.Generator().manual_seed(seed)),
    )


def huge_reward_on_rank_one() -> str:
    """r / alpha overflows on rank 1's rows only: every rank must raise (none may hang)."""
    rank = dist.get_rank()

    def reward(x):
        return torch.full((x.shape[0],), 1e308 if rank == 1 else 0.0, dtype=torch.float64)

    return expect_error(
        num_particles=4,
        layout="sharded",
        potential=ls.RewardTilt(reward, alpha=0.1),
        sample=dict(generator=torch.Generator().manual_seed(0)),
    )


class _WrongSlotOrder(ls.ParticleShards):
    """Broken on purpose: the all-gathered increments laid out rank-major (``[W, B, n]`` read as
    ``[B, N]``), so weights land on the wrong particles."""

    def settle(self, log_w):
        if self._pending:
            parts = self._gather(torch.stack(self._pending))
            self._pending = []
            for increment in torch.cat(parts, dim=1).view(len(parts[0]), *log_w.shape):
                log_w += increment


class _NoExchange(ls.ParticleShards):
    """Broken on purpose: a slot whose ancestor lives on another rank keeps its own particle."""

    def follow(self, index, ctx, prev_twist, base_lp, network):
        n, rows = ctx.num_particles, torch.arange(index.numel())
        slot = rows % (n * self.world_size)
        remote = (index % (n * self.world_size)) // n != slot // n
        return super().follow(torch.where(remote, rows, index), ctx, prev_twist, base_lp, network)


def sample_broken(potential: str, broken: str) -> dict:
    layout = {"slot-order": _WrongSlotOrder, "no-exchange": _NoExchange}[broken]()
    return sample_exact(potential, layout=layout)


# --------------------------------------------------------------------------- exchange plan


def test_plan_exchange_delivers_every_ancestor_and_sends_each_particle_once():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        W, n, batch = (int(torch.randint(1, 5, (1,), generator=g)) for _ in range(3))
        A = torch.randint(0, W * n, (batch, W * n), generator=g)
        ids = torch.arange(batch * W * n).view(batch, W * n)  # a particle's identity
        held = [ids[:, r * n : (r + 1) * n].reshape(-1) for r in range(W)]  # rank r's rows
        plans = [ls.smc.plan_exchange(A, W, r) for r in range(W)]
        for r, ex in enumerate(plans):
            new = torch.full_like(held[r], -1)
            new[ex.keep_to] = held[r][ex.keep_from]
            for p in range(W):
                message = held[p][plans[p].send[r]]  # what rank p sends to r
                assert len(message) == ex.recv_count[p] == len(message.unique())
                new[ex.recv_to[p]] = message[ex.recv_pos[p]]
            assert torch.equal(new, ids.gather(1, A)[:, r * n : (r + 1) * n].reshape(-1))


# --------------------------------------------------------------------------- exact targets


def _two_sample_z(a: dict, b: dict) -> tuple[float, float]:
    """Largest per-state z of the difference of two pooled estimates, and the z of ``Ẑ``."""
    (pa, sa), (pb, sb) = estimate(_as_output(a)), estimate(_as_output(b))
    n = a["tokens"].shape[0] * a["tokens"].shape[1]
    floor = (pa * (1 - pa) / n).clamp_min(1e-12).sqrt()
    z_pi = float(((pa - pb).abs() / torch.maximum((sa**2 + sb**2).sqrt(), floor)).max())
    za, zb = a["log_normalizer"].exp(), b["log_normalizer"].exp()
    se = (za.var() / len(za) + zb.var() / len(zb)).sqrt()
    return z_pi, float((za.mean() - zb.mean()).abs() / se)


def _as_output(result: dict) -> ls.SMCOutput:
    return ls.SMCOutput(
        *(result[k] for k in ("tokens", "log_weights", "log_normalizer", "ess", "resampled")),
        result["ancestors"],
        result["nfe"],
        torch.zeros_like(result["log_normalizer"], dtype=torch.long),
    )


def _exact_z(result: dict, potential: str) -> tuple[float, float, float]:
    """(max z vs the target, max z vs a wrong target, z of E[Ẑ] = Z)."""
    *_, target, Z, wrong = _problem(potential)
    out = _as_output(result)
    pi_hat, se = estimate(out)
    n = out.tokens.shape[0] * out.tokens.shape[1]
    return (
        max_z_score(pi_hat, se, target, n),
        max_z_score(pi_hat, se, wrong, n),
        z_of_normalizer(out, Z),
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("potential", ["self-reward", "tilt"])
def test_sharded_smc_hits_the_exact_target_and_matches_one_process(ranks, potential):
    results = ranks.run(sample_exact, potential=potential)
    for key in ("tokens", "log_weights", "log_normalizer", "ancestors", "resampled"):
        assert torch.equal(results[0][key], results[1][key]), f"{key} differs between ranks"
    sharded = results[0]
    assert sharded["resampled"].any() and sharded["sent"] + results[1]["sent"] > 0
    z_target, z_wrong, z_Z = _exact_z(sharded, potential)
    print(
        f"{potential}: max z {z_target:.2f} (wrong target {z_wrong:.1f}), z of E[Z-hat] {z_Z:.2f}"
    )
    assert z_target < Z_MAX and z_Z < Z_MAX, (z_target, z_Z)
    assert z_wrong > 2 * Z_MAX, "the test cannot tell the wrong target apart"
    # the same statistics as single-process SMC with N particles (another seed: independent)
    local = sample_exact(potential, seed=1, layout="local")
    z_pi, z_Z = _two_sample_z(sharded, local)
    print(f"{potential}: sharded vs one process: max z {z_pi:.2f}, z of Z-hat {z_Z:.2f}")
    assert z_pi < Z_MAX and z_Z < Z_MAX, (z_pi, z_Z)
    rate = [r["resampled"][:, :-1].double().mean(0) for r in (sharded, local)]
    assert torch.allclose(rate[0], rate[1], atol=0.05), rate


@pytest.mark.timeout(120)
def test_only_particles_with_remote_ancestors_travel_once_per_rank(ranks):
    results = ranks.run(sample_exact, potential="self-reward", batch=500)
    out, n = results[0], N // WORLD
    A = out["ancestors"]  # [B, T, N]; the identity where no resample happened
    expected = [0] * WORLD  # rows each rank must send: distinct remote ancestors per destination
    for dst in range(WORLD):
        slots = A[..., dst * n : (dst + 1) * n].sort(-1).values
        distinct = torch.ones_like(slots, dtype=torch.bool)
        distinct[..., 1:] = slots[..., 1:] != slots[..., :-1]
        for src in range(WORLD):
            if src != dst:
                expected[src] += int((distinct & (slots // n == src)).sum())
    assert [r["sent"] for r in results] == expected
    assert sum(r["received"] for r in results) == sum(expected) > 0
    moved_slots = int(((A // n) != torch.arange(N) // n).sum())
    assert sum(expected) <= moved_slots < A.numel()
    # every received particle is evaluated once by its new rank: the honest NFE
    Bn = out["tokens"].shape[0] * N
    assert round(out["nfe"] * Bn) == Bn * L + sum(expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("subgroup", [False, True], ids=["world", "group"])
def test_all_the_weight_on_one_rank_moves_that_particle_everywhere(ranks, subgroup):
    batch, particles = 3, 4
    n = particles // WORLD
    results = ranks.run(one_particle_wins, batch=batch, particles=particles, subgroup=subgroup)
    before = torch.stack([r["before"].view(batch, n, -1) for r in results], 1).flatten(1, 2)
    after = torch.stack([r["after"].view(batch, n, -1) for r in results], 1).flatten(1, 2)
    winner = before[:, n]  # rank 1's first particle of each prompt
    assert not torch.equal(before, winner.unsqueeze(1).expand_as(before))  # rows did differ
    assert torch.equal(after, winner.unsqueeze(1).expand_as(after))  # now all are the winner
    assert (results[0]["ancestors"][:, 0] == n).all()
    # rank 1 sent one row per prompt (not one per slot), rank 0 nothing
    assert [r["sent"] for r in results] == [0, batch]
    assert [r["received"] for r in results] == [batch, 0]


@pytest.mark.timeout(60)
def test_cache_works_with_sharded_particles(ranks):
    plain, cached = (
        ranks.run(sample_exact, potential="self-reward", batch=200, steps=16, cache=c)[0]
        for c in (False, True)
    )
    assert plain["sent"] > 0
    assert torch.equal(plain["tokens"], cached["tokens"])
    assert torch.equal(plain["log_weights"], cached["log_weights"])
    assert cached["nfe"] < 0.75 * plain["nfe"]  # steps that commit nothing reuse their logits


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broken", ["slot-order", "no-exchange"])
def test_breaking_the_sharded_weights_fails_the_exact_check(ranks, broken):
    z_target, _, z_Z = _exact_z(
        ranks.run(sample_broken, potential="self-reward", broken=broken)[0], "self-reward"
    )
    print(f"{broken}: max z vs target {z_target:.1f}, z of E[Z-hat] {z_Z:.1f}")
    assert max(z_target, z_Z) > Z_MAX


# --------------------------------------------------------------------------- one rank, errors


ONE_RANK_CONFIGS = [  # cache, early-finishing blocks, product, proposals, twists, prompts
    "tiny-lowconf-selfreward",
    "tiny-product",
    "tiny-proposal-random",
    "tiny-cache-ancestral",
    "tiny-tilt-greedy-lowconf",
    "exact-random-selfreward",
    "exact-lowconf-selfreward",
    "exact-tilt-M2",
    "exact-product-cond",
    "exact-proposal-ancestral",
    "exact-cache-threshold",
]


@pytest.mark.timeout(120)
def test_one_rank_in_the_sharded_layout_is_bit_identical_to_the_local_layout(world_of_one):
    import test_sampler_equivalence as eq  # its configurations cover the sampler's paths

    sharded = functools.partial(SMCSampler, layout=ls.ParticleShards())
    for name in ONE_RANK_CONFIGS:
        eq._assert_same(eq.run_config(name, sharded), eq.run_config(name))


@pytest.mark.timeout(60)
def test_clear_errors(ranks):
    assert not dist.is_initialized()
    assert "init_process_group" in expect_error(num_particles=4, layout="sharded")
    with pytest.raises(ValueError, match="not a particle layout"):
        SMCSampler(ls.ExactDenoiser(toy_joint(0)), layout="scattered")
    messages = ranks.run(expect_error, num_particles=3, layout="sharded")
    assert all("num_particles=3" in m and "world size 2" in m for m in messages), messages
    messages = ranks.run(
        expect_error, num_particles=4, layout="sharded", sample=dict(record_path=True)
    )
    assert all("record_path" in m for m in messages), messages
    messages = ranks.run(seeded_by_rank)
    assert all("same generator" in m for m in messages), messages


@pytest.mark.timeout(60)
def test_a_non_finite_weight_on_one_rank_stops_every_rank(ranks):
    rank0, rank1 = ranks.run(huge_reward_on_rank_one)
    assert "log-weight became" in rank0 and "log-weight became" in rank1, (rank0, rank1)
    assert "twist" in rank1 and "another rank" in rank0, (rank0, rank1)


# --------------------------------------------------------------------------- benchmark


@pytest.mark.timeout(60)
def test_benchmark_quick(tmp_path):
    report = tmp_path / "sharded.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sharded_particles.py"), "--quick"]
        + ["--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "throughput ratio" in proc.stdout and "global resampling" in proc.stdout, proc.stdout
    result = json.loads(report.read_text())
    assert result["ratio"] > 0 and all(run["nfe"] >= 8 for run in result["sharded"])


def sample_stateful(resampling: str, stateful: bool) -> dict:
    """SR-SMC on 2 ranks with a denoiser whose per-row state must follow its rows (received
    rows arrive with ``-1``), or the same exact denoiser without state."""
    from test_extension_points import StatefulDenoiser

    exact = ls.ExactDenoiser(toy_joint(5))
    denoiser = StatefulDenoiser(exact) if stateful else exact
    sampler = SMCSampler(
        denoiser,
        num_particles=8,
        num_steps=L,
        unmasking="random",
        potential=ls.SelfReward(),
        resampling=resampling,
        resample_when="always",
        layout="sharded",
    )
    out = sampler.sample(L, batch_size=6, generator=torch.Generator().manual_seed(3))
    received = [int((i < 0).sum()) for i in getattr(denoiser, "announced", [])]
    return dict(_summary(out), received=received, resampled=out.resampled)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resampling", ["systematic", "multinomial", "stratified", "residual"])
def test_state_follows_particles_across_ranks(ranks, resampling):
    with_state = ranks.run(sample_stateful, resampling=resampling, stateful=True)
    without = ranks.run(sample_stateful, resampling=resampling, stateful=False)
    for a, b in zip(with_state, without, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["log_weights"], b["log_weights"])
        assert a["resampled"].any()
    assert sum(sum(r["received"]) for r in with_state) > 0  # some rows crossed ranks
