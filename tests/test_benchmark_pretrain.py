"""Smoke run of benchmarks/pretrain_and_cache.py (format and invariants only, never timings)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_and_cache_benchmark_quick(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/pretrain_and_cache.py"),
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "pretraining throughput" in res.stdout and "NFE cached" in res.stdout
    report = json.loads(out.read_text())
    assert report["train_tokens_per_s"] > 0
    for row in report["sampling"]:
        assert row["identical"] and row["cached_nfe"] <= row["plain_nfe"] == row["steps"]
