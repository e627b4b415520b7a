"""Smoke test of the sampler-overhead benchmark (benchmarks/sampler_overhead.py --quick).

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
