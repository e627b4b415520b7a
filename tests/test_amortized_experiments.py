"""The amortized-proposal experiment scripts: the ablation report and the training-curve plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def test_ablation_report_renders_every_row_with_standard_errors(tmp_path):

    rows = [
        {
            "setting": "zero adapter (untrained)",
            "steps": 0,
            "loss": 4.69,
            "rollout_reward": [0.173, 0.052],
            "smc_reward": [0.754, 0.024],
            "smc_ess": 0.539,
            "seconds": 0.0,
        },
        {
            "setting": "paired greedy",
            "steps": 100,
            "loss": 0.84,
            "rollout_reward": [0.120, 0.050],
            "smc_reward": [0.730, 0.021],
            "smc_ess": 0.515,
            "seconds": 1442.0,
        },
    ]
    (tmp_path / "abl.json").write_text(json.dumps(rows))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments/amortized_ablation.py"),
            "--report",
            "--out",
            str(tmp_path / "abl"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = (tmp_path / "abl.md").read_text()
    assert table in out + "\n" or table.strip() in out
    assert "| paired greedy | 100 | 0.840 | 0.120 ± 0.050 | 0.730 ± 0.021 | 0.515 | 1442 |" in table
    assert table.count("\n| ") == 3  # header + 2 rows (the separator starts with |---)


def test_training_curves_plot_reads_a_lightning_csv(tmp_path):
    import plot_training_curves as plot

    csv = tmp_path / "metrics.csv"
    lines = ["epoch,step,train/is_ess,train/loss,train/rollout_reward,val/rollout_reward"]
    for step in range(4, 60, 5):
        lines.append(f"0,{step},{0.2 + step / 300},{2 - step / 60},{step / 100},")
    lines.append("0,49,,,,0.4")
    csv.write_text("\n".join(lines) + "\n")
    columns = plot.read_columns(csv)
    assert columns["val/rollout_reward"] == [(49, 0.4)]
    assert len(columns["train/loss"]) == 12
    assert plot.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    plot.main([str(csv), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,step,train/loss\n0,1,2.0\n")
    with pytest.raises(SystemExit, match="no column"):
        plot.main([str(bad), "--out", str(tmp_path / "x.png")])
