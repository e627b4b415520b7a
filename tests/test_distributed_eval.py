"""Distributed evaluation: sharding, torchmetrics reduction and ``sample`` under torchrun (gloo, CPU).

A prompt's answer depends only on its global index and the seed, so any sharding over any
number of processes must reproduce a single process: exactly the same answers (token ids,
texts), resampling decisions and metrics of them (rewards, entropy, Dist-n, counts); weights,
log Ẑ and the ESS up to float rounding (``WEIGHT_TOL``), since each rank runs the network on
another batch composition (and thread count), whose float32 matmuls round differently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from tolerance import rounding_tolerance

from lightning_smc import dist
from lightning_smc.evaluation import MethodResult, evaluate_method
from lightning_smc.methods import load_method_config
from lightning_smc.metrics import METRICS, MetricSet, success_threshold_of

ROOT = Path(__file__).resolve().parents[1]
SMC_BASE = str(ROOT / "configs/methods/embedded/smc_base.yaml")
SRSMC = str(ROOT / "configs/methods/embedded/srsmc.yaml")
SMALL = ["--seq_len", "12", "--method.num_steps", "4", "--method.num_particles", "3"]
TIMEOUT = 180  # seconds: a hang becomes a failure, not a stuck suite
# Log-weights and log Ẑ sum, over the 12 generated positions, differences of two float32
# log-probabilities of the embedded MDLM (vocabulary 4096), normalized over particles: 4 float32
# ulps per term of size log V (see tests/tolerance.py): 4.8e-5.
WEIGHT_TOL = rounding_tolerance(12, math.log(4096), ulps=4)
# gen_ppl = exp(mean NLL) of the tiny GPT-2 scorer (vocabulary 15): a mean of float32 NLLs of
# size log V, each from a forward of another batch composition: 4 float32 ulps of log V,
# relative to the perplexity.
PPL_RTOL = rounding_tolerance(1, math.log(15), ulps=4)
TOY_TOL = rounding_tolerance(6, math.log(20), ulps=4)  # test_amortized.toy_module: L=6, V=20
FLOAT_FIELDS = {"log_normalizer", "log_weights", "ess_trace"}  # MethodResult: from the weights


# ------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("contiguous", [True, False], ids=["blocks", "strided"])
@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_partition_the_items(n, world, contiguous):
    shards = [dist.shard_indices(n, world, r, contiguous=contiguous) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if contiguous:
        assert [i for s in shards for i in s] == list(range(n))  # rank order = index order
    else:
        assert all(i % world == r for r, s in enumerate(shards) for i in s)


def test_bad_shards_and_environment_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="rank=2 must be in"):
        dist.shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="world_size=0"):
        dist.shard_indices(4, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*torchrun"):
        dist.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.init_from_env() is False and dist.world_size() == 1 and dist.rank() == 0


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        rows = torch.arange(3 * (rank + 1) * 2, dtype=torch.float64).reshape(-1, 2) + 100 * rank
        gathered = {
            "objects": dist.all_gather_object({"rank": rank, "text": "x" * rank}),
            "tensors": dist.all_gather_tensor(rows),  # 3 rows on rank 0, 6 on rank 1
            "empty": dist.all_gather_tensor(torch.zeros(rank, 2, dtype=torch.long)),
            "scalars": dist.all_gather_tensor(torch.tensor(float(rank))),
        }
        torch.save(gathered, Path(out_dir) / f"gather{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_gathers_of_objects_and_uneven_tensors(tmp_path):
    assert dist.all_gather_object("alone") == ["alone"]  # no process group: one process
    spawn(_gather_worker, 2, (dist.free_port(), str(tmp_path)), timeout=120)
    rows = [
        torch.arange(3 * (r + 1) * 2, dtype=torch.float64).reshape(-1, 2) + 100 * r for r in (0, 1)
    ]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"gather{rank}.pt", weights_only=False)
        assert got["objects"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "x"}]
        assert all(torch.equal(a, b) for a, b in zip(got["tensors"], rows, strict=True))
        assert [tuple(t.shape) for t in got["empty"]] == [(0, 2), (1, 2)]
        assert [float(t) for t in got["scalars"]] == [0.0, 1.0]


def _rank_zero_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    calls = []

    def compute():
        calls.append(rank)
        return {"value": 41 + rank}

    def broken():
        raise ZeroDivisionError("no scores")

    try:
        value = dist.on_rank_zero(compute)
        try:
            dist.on_rank_zero(broken, what="scoring gsm8k")
            error = None
        except Exception as err:  # noqa: BLE001 - the test looks at what every rank raised
            error = (type(err).__name__, str(err))
        torch.save({"value": value, "calls": calls, "error": error}, Path(out_dir) / f"z{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_on_rank_zero_shares_its_value_and_its_error_with_every_rank(tmp_path):
    assert dist.on_rank_zero(lambda: 7) == 7  # no process group: runs here
    spawn(_rank_zero_worker, 2, (dist.free_port(), str(tmp_path)), timeout=120)
    zero, one = (torch.load(tmp_path / f"z{r}.pt", weights_only=False) for r in (0, 1))
    assert zero["value"] == one["value"] == {"value": 41}  # rank zero's, computed once
    assert zero["calls"] == [0] and one["calls"] == []
    assert zero["error"] == ("ZeroDivisionError", "no scores")
    assert one["error"][0] == "RuntimeError"
    assert "scoring gsm8k failed on rank zero" in one["error"][1] and "no scores" in one["error"][1]


# ---------------------------------------------------- evaluate_method: 2 gloo ranks = 1 rank
CASES = {
    # 5 prompts on 2 ranks: blocks of 3 and 2; resampling after every step gives overtakes
    "smc_base": (SMC_BASE, [*SMALL, "--num_samples", "5", "--batch_size", "2",
                            "--method.resample_when", "every:1"]),
    # 1 prompt on 2 ranks: rank 1 has nothing to sample and must still take part
    "one_prompt": (SRSMC, [*SMALL, "--num_samples", "1", "--reward",
                           '{"class_path": "lightning_smc.rewards.VaderSentiment", '
                           '"init_args": {"tokenizer": "embedded"}}']),
}  # fmt: skip


def evaluate_cases(lm_dir: str) -> dict[str, tuple[dict[str, float], MethodResult]]:
    """Every metric of every case, through ``evaluate_method`` (in whatever group exists)."""
    out = {}
    for name, (config, overrides) in CASES.items():
        run = load_method_config(config, overrides)
        metrics = MetricSet(
            list(METRICS),
            reward=True,
            holdout=run.holdout is not None,
            success_threshold=success_threshold_of(run.reward),
            gen_ppl_model=lm_dir,
        )
        out[name] = evaluate_method(run, metrics)
    return out


def _evaluate_worker(rank: int, world: int, port: int, out_dir: str, lm_dir: str) -> None:
    from lightning_smc.evaluation import run as methods

    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=90),
    )
    sampled = []  # the prompts this rank sampled itself, per case
    run_method = methods.run_method

    def recording(*args, **kwargs):
        result = run_method(*args, **kwargs)
        sampled.append(result.index.tolist())
        return result

    methods.run_method = recording
    try:
        assert (dist.rank(), dist.world_size()) == (rank, world)
        results = evaluate_cases(lm_dir)
        torch.save((results, sampled), Path(out_dir) / f"rank{rank}.pt")
    finally:
        methods.run_method = run_method
        tdist.destroy_process_group()


def spawn(fn, world: int, args: tuple, timeout: float = TIMEOUT) -> None:
    """``torch.multiprocessing`` processes ``fn(rank, world, *args)``, killed after ``timeout``."""
    context = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} processes did not finish within {timeout} s")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from test_metrics import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def assert_summaries_match(
    a: dict, b: dict, name: str, num_answers: int, tol: float = WEIGHT_TOL
) -> None:
    """Two metric summaries of the same ``num_answers`` answers: metrics of the tokens and texts
    (rewards, entropy, Dist-n, resampling counts, NFE) exactly; those of the weights to their
    rounding (``tol`` on each log-weight and log Ẑ)."""
    assert set(a) == set(b), name
    for key in a:
        if key in ("seconds", "seconds_se"):  # wall time
            continue
        if key == "ess_se":
            # per-sample ESS / N (<= 1) each within 2 tol (below): the sample standard deviation
            # moves by at most max|delta| sqrt(n / (n - 1)), its SE by max|delta| / sqrt(n - 1)
            assert b[key] == pytest.approx(a[key], rel=0, abs=2 * tol), (name, key)
        elif key == "gen_ppl_se":
            # ppl * SE of the mean NLL per token: each answer's summed NLL moves by PPL_RTOL per
            # token, so the SE of the ratio by at most 2 PPL_RTOL (max / mean length) / sqrt(n - 1);
            # the answers here are at most 4x longer than the mean (same bound for the ppl factor)
            assert b[key] == pytest.approx(a[key], rel=0, abs=8 * PPL_RTOL * a["gen_ppl"]), (
                name,
                key,
            )
        elif key == "ess":  # mean of ESS / N: relative error at most twice the log-weights'
            assert b[key] == pytest.approx(a[key], rel=2 * tol, abs=0), (name, key)
        elif key == "log_z_mean":
            assert b[key] == pytest.approx(a[key], rel=0, abs=tol), (name, key)
        elif key == "log_z_var":
            # var = sum d_i^2 / (n - 1), d_i = log Z_i - mean, each d_i within 2 tol: the change
            # is at most 4 tol max|d_i| n / (n - 1), and max|d_i| <= sqrt((n - 1) var)
            n = num_answers
            bound = 4 * tol * math.sqrt((n - 1) * a[key]) * n / (n - 1)
            assert b[key] == pytest.approx(a[key], rel=0, abs=bound), (name, key)
        elif key == "gen_ppl":
            assert b[key] == pytest.approx(a[key], rel=PPL_RTOL, abs=0), (name, key)
        else:
            assert a[key] == b[key], (name, key)  # bit for bit


def assert_same(one: tuple, other: tuple, name: str) -> None:
    (summary_a, result_a), (summary_b, result_b) = one, other
    assert_summaries_match(summary_a, summary_b, name, len(result_a))
    for field in MethodResult.__dataclass_fields__:
        a, b = getattr(result_a, field), getattr(result_b, field)
        if field == "sample_seconds":
            continue
        if field in FLOAT_FIELDS:
            assert a.dtype == b.dtype, (name, field)
            rtol = 2 * WEIGHT_TOL if field == "ess_trace" else 0  # see assert_summaries_match
            atol = 0 if field == "ess_trace" else WEIGHT_TOL
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=f"{name}: {field}")
        elif isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, field)
        else:
            assert a == b, (name, field)


def test_two_gloo_ranks_give_the_single_process_metrics_and_answers(tiny_lm, tmp_path):
    single = evaluate_cases(str(tiny_lm))  # no process group here: one process
    assert set(single["smc_base"][0]) >= {
        "reward", "success", "holdout", "gen_ppl", "entropy", "dist_1", "dist_2", "dist_3",
        "ess", "log_z_mean", "log_z_var", "resamples", "overtakes", "overtake_rate", "nfe",
        "nfe_answer", "seconds",
    }  # fmt: skip
    assert single["smc_base"][0]["resamples"] == 3.0  # 4 steps, a resample after the first 3
    spawn(_evaluate_worker, 2, (dist.free_port(), str(tmp_path), str(tiny_lm)))
    own = {}
    for rank in (0, 1):
        sharded, own[rank] = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name in CASES:
            assert_same(single[name], sharded[name], f"{name}, rank {rank}")
    # each rank sampled only its block (smc_base: 5 prompts; one_prompt: 1 prompt)
    assert own == {0: [[0, 1, 2], [0]], 1: [[3, 4], []]}


# ----------------------------------------------------------------------- sample under torchrun
def torchrun(args: list[str], nproc: int, tmp_path: Path, env: dict | None = None):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={dist.free_port()}",
        "-m",
        "lightning_smc.sample",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_sample_with_two_processes_writes_the_single_process_files(tmp_path):
    from lightning_smc.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING\nGood morrow\n\nTo be\nWhat say you\n")  # 5 prompts, mixed lengths
    args = [
        "--compare", SMC_BASE, SRSMC, "--prompts", str(prompts), *SMALL, "--batch_size", "2",
        "--metrics", "reward,holdout,entropy,dist,ess,log_z,resamples,overtakes,nfe,seconds",
    ]  # fmt: skip
    one = main([*args, "--out", str(tmp_path / "one")])
    done = torchrun([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    lines = (tmp_path / "one/samples.jsonl").read_text()
    records = [json.loads(line) for line in lines.splitlines()]
    records_two = [json.loads(x) for x in (tmp_path / "two/samples.jsonl").read_text().splitlines()]
    assert len(records_two) == len(records)
    for a, b in zip(records, records_two, strict=True):
        # text, tokens, rewards, entropy exactly; weights W_i (relative error = that of log W_i)
        # and log Ẑ to WEIGHT_TOL
        assert b.pop("log_normalizer") == pytest.approx(a.pop("log_normalizer"), abs=WEIGHT_TOL)
        assert b.pop("weights") == pytest.approx(a["weights"], rel=WEIGHT_TOL, abs=0)
        assert {k: v for k, v in a.items() if k != "weights"} == b
    assert [(r["method"], r["index"]) for r in records] == [
        (m, i) for m in ("SMCbase", "SR-SMC") for i in range(5)
    ]
    assert all(len(r["weights"]) == 3 and abs(sum(r["weights"]) - 1) < 1e-9 for r in records)
    two = json.loads((tmp_path / "two/summary.json").read_text())
    for method, row in one.items():
        assert_summaries_match(row, two[method], method, num_answers=5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "samples.jsonl",
        "summary.json",
    ]
    assert "2 processes" in done.stdout  # one table, printed by rank zero
    assert done.stdout.count("method(s)") == 1


FAILING_REWARD = '''
import torch.distributed as dist
from lightning_smc.rewards import BaseReward


class FailOnRank(BaseReward):
    """A reward that raises on one rank, as a scorer that crashes there would."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def __call__(self, x0):
        if dist.is_initialized() and dist.get_rank() == self.rank:
            raise RuntimeError(f"reward failed on purpose on rank {self.rank}")
        return x0.double().mean(-1)
'''


def test_a_failing_rank_fails_the_whole_job_instead_of_hanging(tmp_path):
    (tmp_path / "failing_reward.py").write_text(FAILING_REWARD)
    reward = '{"class_path": "failing_reward.FailOnRank", "init_args": {"rank": 1}}'
    args = ["--config", SMC_BASE, *SMALL, "--num_samples", "4", "--reward", reward,
            "--holdout", "null", "--out", str(tmp_path / "out")]  # fmt: skip
    start = time.monotonic()
    done = torchrun(args, 2, tmp_path, env={"PYTHONPATH": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    assert "reward failed on purpose on rank 1" in output
    assert not (tmp_path / "out").exists()  # rank 0 wrote nothing either
    print(f"failed job ended after {time.monotonic() - start:.1f} s")


# ------------------------------------------------------- the callback under Lightning DDP
DDP_FIT = """
import sys
import lightning as L
import torch
sys.path.insert(0, sys.argv[2])
from test_amortized import ALPHA, toy_module
from lightning_smc.callbacks import RewardEvaluation
from lightning_smc.methods import Method, RewardTiltSpec

torch.set_num_threads(1)
evaluation = RewardEvaluation(
    [Method(name="SMCbase", num_particles=3, num_steps=6, potential=RewardTiltSpec(alpha=ALPHA),
            resample_when="every:2")],
    num_prompts=5,
    metrics=["reward", "success", "ess", "log_z", "resamples", "overtakes", "nfe", "entropy",
             "seconds"],
)
L.Trainer(
    accelerator="cpu", devices=int(sys.argv[3]), strategy="ddp" if sys.argv[3] != "1" else "auto",
    logger=False, callbacks=[evaluation], max_steps=2, val_check_interval=2,
    num_sanity_val_steps=0, enable_progress_bar=False, enable_checkpointing=False,
    enable_model_summary=False, default_root_dir=sys.argv[1],
).fit(toy_module(steps_per_epoch=4))  # 2 batches per rank under 2-process DDP
"""


def test_callback_under_lightning_ddp_equals_one_process(tmp_path):
    """End to end: ``RewardEvaluation`` in a 2-process DDP fit (torchrun) writes the eval.json
    of a 1-process fit (but for wall time)."""
    script = tmp_path / "fit.py"
    script.write_text(DDP_FIT)
    histories = {}
    for world in (1, 2):
        root = tmp_path / f"world{world}"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   "--master_addr=127.0.0.1", f"--master_port={dist.free_port()}", str(script),
                   str(root), str(Path(__file__).parent), str(world)]  # fmt: skip
        done = subprocess.run(
            command,
            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        histories[world] = json.loads((root / "eval.json").read_text())
    assert len(histories[1]) == len(histories[2])
    for one, two in zip(histories[1], histories[2], strict=True):
        assert set(one) == set(two)
        for key in one:
            if isinstance(one[key], dict):  # a method's metrics, 5 answers of 6 tokens of 20
                assert_summaries_match(one[key], two[key], key, 5, TOY_TOL)
            else:
                assert one[key] == two[key], key
    assert {"log_z_var", "overtake_rate", "entropy"} <= set(histories[1][0]["SMCbase"])


def test_sample_with_particles_sharded_over_two_processes(tmp_path):
    """``--method.shard_particles true``: each rank holds N / 2 particles of every prompt and
    resampling is global; rank zero writes every prompt once, with all N weights."""
    args = ["--config", SRSMC, *SMALL, "--num_samples", "3", "--method.num_particles", "4",
            "--method.resample_when", "always", "--method.shard_particles", "true",
            "--metrics", "entropy,ess,log_z,resamples,nfe"]  # fmt: skip
    done = torchrun([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(x) for x in (tmp_path / "two/samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(len(r["weights"]) == 4 and abs(sum(r["weights"]) - 1) < 1e-9 for r in records)
    summary = json.loads((tmp_path / "two/summary.json").read_text())["SR-SMC"]
    assert summary["resamples"] > 0  # global resampling happened across the two ranks
    # one process: the sharded layout over a single rank is the local one
    from lightning_smc.sample import main

    one = main([*args, "--out", str(tmp_path / "one")])["SR-SMC"]
    assert set(one) == set(summary)
