"""Smoke test of benchmarks/image_throughput.py (--quick): the tables and the JSON report."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "image_throughput.py"


def test_image_throughput_quick(tmp_path):
    out = tmp_path / "images.json"
    args = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("settings: model=random_tiny_image")
    for name in ("vq encode", "vq decode", "N=1", "N=8", "N=16"):
        assert any(line.startswith(name) for line in lines), proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["grid"] == [7, 7] and report["settings"]["unmasking"] == "maskgit"
    for r in report["vq"].values():
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    assert set(report["sampling"]) == {"N=1", "N=8", "N=16"}
    for name, r in report["sampling"].items():
        n = int(name[2:])
        assert r["nfe"] == report["settings"]["steps"]
        assert math.isclose(r["particles_per_s"], n * r["images_per_s"], rel_tol=1e-9)
