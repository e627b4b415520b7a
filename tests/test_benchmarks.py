"""Smoke tests of the benchmarks (benchmarks/sampler_overhead.py --quick and on the embedded
model at tiny sizes).

Checks the table and the JSON report only; timings on shared CPUs are noisy, so no bound on
the overhead ratio is asserted beyond what holds by construction (forward time <= wall time).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sampler_overhead.py"
CONFIGS = ("ancestral", "sr-smc", "sr-smc-block")


def test_sampler_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--threads",
            "1",
            "--repeats",
            "3",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("config"))
    for column in ("wall s", "forward s", "overhead", "NFE"):
        assert column in header
    for name in CONFIGS:
        assert any(line.split()[:1] == [name] for line in proc.stdout.splitlines()), proc.stdout

    report = json.loads(out.read_text())
    assert set(report["configs"]) == set(CONFIGS)
    for name in CONFIGS:
        r = report["configs"][name]
        assert len(r["ratios"]) == 3
        assert math.isfinite(r["ratio"]) and r["ratio"] >= 1.0
        assert all(math.isfinite(x) and x >= 1.0 for x in r["ratios"])
        assert 0.0 < r["forward_s"] <= r["wall_s"]
        assert r["nfe"] == report["sizes"]["steps"]
        assert r["forward_calls"] == report["sizes"]["steps"]


def test_sampler_overhead_on_the_embedded_model(tmp_path):
    """The default model: the committed MDLM, sizes read from its checkpoint, log-prob outputs."""
    out = tmp_path / "overhead.json"
    args = ["--configs", "ancestral", "sr-smc", "--steps", "4", "--seq-len", "16"]
    args += ["--particles", "2", "--repeats", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "embedded MDLM (mdlm_tiny): vocab_size=4096" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "embedded" and report["outputs_log_probs"] is True
    assert report["sizes"]["vocab_size"] == 4096 and report["sizes"]["n_layers"] == 4
    for r in report["configs"].values():
        assert 0.0 < r["forward_s"] <= r["wall_s"] and r["forward_calls"] == 4
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--layers", "2"], cwd=ROOT, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "--layers sizes the tiny model" in refused.stderr


@pytest.mark.slow  # four torchrun launches (~45 s); the 1-vs-2-process equality itself is in CI
def test_distributed_sample_quick(tmp_path):
    out = tmp_path / "distributed.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/distributed_sample.py"),
            "--quick",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["identical"] and [r["processes"] for r in report["rows"]] == [1, 2]
    assert "throughput ratio (2 / 1 processes)" in proc.stdout
