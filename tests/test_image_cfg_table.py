"""The image CFG x steps table script (experiments/image_cfg_table.py) end to end at tiny size."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from lightning_smc.data.images import DEFAULT_ROOT, missing_data_message  # noqa: E402


def test_table_runs_on_a_random_model_and_reports_every_cell(tmp_path):
    missing = [f for f in ("t10k-images-idx3-ubyte.gz",) if not (Path(DEFAULT_ROOT) / f).is_file()]
    if missing:
        pytest.skip(missing_data_message(DEFAULT_ROOT, missing))
    import image_cfg_table

    image_cfg_table.main(
        ["--model", "random_tiny_image", "--per-class", "2", "--steps", "2", "--weights",
         "1,1.5", "--splits", "2", "--reference-size", "60", "--out", str(tmp_path)]
    )  # fmt: skip
    record = json.loads((tmp_path / "image_cfg_table.json").read_text())
    rows = record["rows"]
    assert [r["setting"] for r in rows] == [
        "real (train, n=20)",
        "CFG 1, 2 steps",
        "CFG 1.5, 2 steps",
    ]
    for row in rows:
        assert row["n"] == 20 and row["fid"] >= 0 and 0 <= row["accuracy"] <= 1
    # the product target costs two network evaluations per step, the plain sampler one
    assert rows[1]["nfe"] == 2 and rows[2]["nfe"] == 4
    # real images are far closer to the test set than an untrained model's samples
    assert rows[0]["fid"] < rows[1]["fid"] and rows[0]["accuracy"] > rows[1]["accuracy"]
    assert (tmp_path / "grid_w1.5_s2.png").is_file()
    assert "| CFG 1.5, 2 steps | 1 | 4 |" in (tmp_path / "image_cfg_table.md").read_text()
