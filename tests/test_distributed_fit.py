"""DDP training of the amortized proposal on CPU (gloo), through the real ``fit`` entry point.

Every run is a subprocess: ``python -m lightning_smc.fit`` with ``devices=2, strategy=ddp``
(Lightning launches the second process), or two ``torchrun --nnodes=2`` launches on loopback.
The test callbacks in ``tests/ddp_probe.py`` record each rank's trainable parameters.

- 2 processes with ``rollouts=2`` each = 1 process with ``rollouts=4`` (same global rollouts and
  transitions; DDP averages equal per-rank means): the same losses and, after two steps, the
  same parameters up to float rounding (Adam amplifies rounding over longer runs: 2e-7 after
  2 steps, 2e-5 after 4 without replay, measured);
- the checkpoint is written once (rank zero) and a 2 + 2-step resume equals 4 straight steps bit
  for bit, replay buffer included (every rank's rows are saved);
- two ``torchrun`` "nodes" on 127.0.0.1 agree with each other and with the 2-device run;
- a rank that raises during validation fails the whole job with its error (no hang).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tolerance import rounding_tolerance

from lightning_smc.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds per launched job: a hang fails the test instead of blocking CI


def _config(
    tmp: Path,
    name: str,
    *,
    devices: int = 2,
    num_nodes: int = 1,
    rollouts: int = 2,
    steps: int = 4,
    fail_rank: int | None = None,
) -> tuple[Path, Path]:
    root = tmp / name
    callbacks = [
        {"class_path": "ddp_probe.ParamDump", "init_args": {"directory": str(root / "params")}}
    ]
    trainer = {
        "accelerator": "cpu",
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": "ddp" if devices * num_nodes > 1 else "auto",
        "max_steps": steps,
        "logger": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    if fail_rank is not None:
        trainer.update(limit_val_batches=1, val_check_interval=1)
        callbacks.append({"class_path": "ddp_probe.FailOnRank", "init_args": {"rank": fail_rank}})
    model = {
        "class_path": "lightning_smc.modules.AmortizedProposalModule",
        "init_args": {
            "base": "embedded",
            "reward": {
                "class_path": "lightning_smc.rewards.VaderSentiment",
                "init_args": {"tokenizer": "embedded"},
            },
            "seq_len": 8,
            "num_steps": 4,
            "rollouts": rollouts,
            "transitions": 2,
            "replay_size": 2,
            "lr": 1.0e-2,
            "steps_per_epoch": 100,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": trainer, "model": model}))
    return path, root


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_smc.fit", "--config", str(config), *extra]
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _params(root: Path, world: int) -> list[dict]:
    records = [torch.load(root / "params" / f"rank{r}.pt") for r in range(world)]
    assert [r["world"] for r in records] == [world] * world
    return records


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_step_ddp(tmp_path_factory):
    """2 processes, 2 steps: the run the resume and multi-node tests start from."""
    tmp = tmp_path_factory.mktemp("ddp")
    config, root = _config(tmp, "two_steps", steps=2)
    _ok(_fit(config))
    return tmp, root


def test_two_processes_match_one_process_with_the_global_batch(two_step_ddp):
    tmp, ddp = two_step_ddp
    a0, a1 = _params(ddp, 2)
    assert a0["step"] == 2 and _max_diff(a0["params"], a1["params"]) == 0.0  # ranks agree
    config, single = _config(tmp, "single", devices=1, rollouts=4, steps=2)
    _ok(_fit(config))
    (b,) = _params(single, 1)
    # the same global rollouts and transitions: the same losses and updates up to rounding
    # (float32 forwards of 2 vs 4 rows; Adam then divides by sqrt(v), so compare early steps).
    # The losses are means of float32 log-probabilities of the embedded MDLM: each of its 4
    # blocks and the head adds a rounded contribution of size about log V (V = 4096) to each
    # logit; 4 float32 ulps per contribution (tests/tolerance.py), relative to the loss: 2e-5
    rtol = rounding_tolerance(4 + 1, math.log(4096), ulps=4)
    assert torch.allclose(torch.tensor(a0["losses"]), torch.tensor(b["losses"]), rtol=rtol)
    lora_b = [k for k in b["params"] if "lora_B" in k]
    moved = torch.cat([b["params"][k].flatten() for k in lora_b])
    assert float(moved.abs().max()) > 1e-3  # training moved the adapter (zero-initialised B) ...
    # ... and both world sizes made the same update. Adam's first steps are ~lr * sign(gradient),
    # so an entry whose gradient is at rounding level (~1e-9) can move by up to lr either way:
    # almost every entry agrees to 1e-5 and the adapter's update agrees in norm.
    diff = torch.cat([(a0["params"][k] - b["params"][k]).abs().flatten() for k in b["params"]])
    assert float((diff > 1e-5).double().mean()) < 1e-3, int((diff > 1e-5).sum())
    moved_a = torch.cat([a0["params"][k].flatten() for k in lora_b])
    assert float((moved_a - moved).norm() / moved.norm()) < 1e-2


def test_ddp_checkpoint_is_written_once_and_resumes_exactly(two_step_ddp):
    tmp, half = two_step_ddp
    config, straight = _config(tmp, "straight")  # 4 straight steps on 2 processes
    _ok(_fit(config))
    a0, _ = _params(straight, 2)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    ckpt = torch.load(straight / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert [p["x_from"].shape[1] for p in ckpt["replay"]] == [4, 4]  # both ranks' rows
    # resume the 2-step run to 4 steps: bit for bit the straight run, replay buffers included
    config, resumed = _config(tmp, "resumed")
    _ok(_fit(config, "--ckpt_path", str(half / "checkpoints/last.ckpt")))
    c0, _ = _params(resumed, 2)
    assert c0["step"] == 4 and _max_diff(a0["params"], c0["params"]) == 0.0
    assert c0["losses"] == a0["losses"][2:]


def _launch_together(commands: list[tuple[list[str], dict[str, str]]]) -> None:
    """Start one process per ``(command, env)`` at once (as two nodes or ``srun`` would), wait
    for all of them (bounded by ``TIMEOUT``) and require that each succeeded."""
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd, env in commands
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-6000:]


def _assert_equals_devices_run(root: Path, devices_run: Path) -> None:
    """Both ranks of the run in ``root`` agree, and equal the 1-node x 2-device run."""
    r0, r1 = _params(root, 2)
    (d0, _) = _params(devices_run, 2)
    assert r0["step"] == 2
    assert _max_diff(r0["params"], r1["params"]) == 0.0
    assert _max_diff(r0["params"], d0["params"]) == 0.0


def test_two_torchrun_nodes_on_loopback_agree(two_step_ddp):
    tmp, devices_run = two_step_ddp
    config, root = _config(tmp, "nodes", devices=1, num_nodes=2, steps=2)
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    fit = ["-m", "lightning_smc.fit", "--config", str(config)]
    _launch_together([([*node, f"--node_rank={rank}", *fit], _env()) for rank in (0, 1)])
    _assert_equals_devices_run(root, devices_run)  # 2 nodes x 1 = 1 node x 2 devices


def test_slurm_environment_launch(two_step_ddp):
    """Two processes started as ``srun`` starts them (SLURM's variables, no launcher):
    Lightning's ``SLURMEnvironment`` wires them into one job, as scripts/slurm_amortized.sh
    relies on."""
    tmp, devices_run = two_step_ddp
    config, root = _config(tmp, "slurm", steps=2)
    slurm = dict(
        _env(),
        SLURM_JOB_NAME="lsmc-test",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODELIST="127.0.0.1",
        SLURM_NODEID="0",
        MASTER_PORT=str(free_port()),
    )
    cmd = [sys.executable, "-m", "lightning_smc.fit", "--config", str(config)]
    _launch_together(
        [(cmd, dict(slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))) for r in (0, 1)]
    )
    _assert_equals_devices_run(root, devices_run)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_fails_the_job_with_its_error(tmp_path, rank):
    config, _ = _config(tmp_path, "fail", steps=2, fail_rank=rank)
    proc = _fit(config)  # bounded by TIMEOUT: a hang raises TimeoutExpired
    assert proc.returncode != 0
    assert f"evaluation failed on rank {rank} (FailOnRank)" in proc.stdout + proc.stderr
