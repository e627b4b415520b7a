"""experiments/reward_smc_table.py: its standard-error helpers and a tiny end-to-end run."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_smc.metrics.diversity import distinct_n

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = ROOT / "experiments" / "reward_smc_table.py"
_spec = importlib.util.spec_from_file_location("reward_smc_table", _SCRIPT)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def test_mean_se_is_std_ddof1_over_sqrt_n():
    mean, se = table.mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(((4 + 1 + 0 + 9) / 3) / 4))
    assert table.mean_se([0, 0, 1, 1]) == (0.5, pytest.approx(math.sqrt(1 / 3 / 4)))
    assert math.isnan(table.mean_se([2.0])[1])


def test_ratio_se_is_the_delta_method_of_a_ratio_of_means():
    a = np.array([10.0, 14.0, 9.0, 20.0, 15.0])
    b = np.array([4.0, 5.0, 3.0, 8.0, 6.0])
    ratio, se = table.ratio_se(a, b)
    assert ratio == pytest.approx(a.sum() / b.sum())
    # brute force: gradient of mean(a) / mean(b) against the sample covariance of (a, b)
    grad = np.array([1 / b.mean(), -a.mean() / b.mean() ** 2])
    cov = np.cov(np.stack([a, b]), ddof=1)
    assert se == pytest.approx(math.sqrt(grad @ cov @ grad / len(a)), rel=1e-12)
    # a constant ratio has no spread
    assert table.ratio_se(3 * b, b) == (pytest.approx(3.0), pytest.approx(0.0, abs=1e-12))


def test_ratio_se_matches_the_spread_of_repeated_experiments():
    rng = np.random.default_rng(0)
    n, repeats = 200, 2000
    b = rng.integers(5, 40, size=(repeats, n)).astype(float)  # tokens per text
    a = b * rng.gamma(4.0, 0.8, size=(repeats, n))  # summed NLL per text
    ratios, ses = zip(*(table.ratio_se(a[r], b[r]) for r in range(repeats)), strict=True)
    assert np.mean(ses) == pytest.approx(np.std(ratios, ddof=1), rel=0.08)


def test_gen_ppl_se_is_exp_of_the_token_weighted_ratio_and_drops_empty_texts():
    nll, counts = np.array([20.0, 33.0, 0.0, 41.0]), np.array([10, 12, 0, 15])
    ppl, se = table.gen_ppl_se(nll, counts)
    log_ppl, log_se = table.ratio_se(nll[[0, 1, 3]], counts[[0, 1, 3]])
    assert ppl == pytest.approx(math.exp(94.0 / 37.0))
    assert (ppl, se) == (pytest.approx(math.exp(log_ppl)), pytest.approx(ppl * log_se))


TEXTS = ["the cat sat", "the cat ran away", "a dog sat on the mat", "the cat sat", "ok"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dist_bootstrap_value_is_distinct_n_and_the_se_is_seeded(n):
    value, se = table.dist_bootstrap(TEXTS, n, resamples=200, seed=0)
    assert value == pytest.approx(distinct_n(TEXTS, n))
    assert math.isfinite(se) and se > 0
    assert table.dist_bootstrap(TEXTS, n, resamples=200, seed=0) == (value, se)
    assert table.dist_bootstrap(TEXTS, n, resamples=200, seed=1)[1] != se


def test_dist_jackknife_leaves_each_text_out():
    value, se = table.dist_jackknife(TEXTS, 2)
    assert value == pytest.approx(distinct_n(TEXTS, 2))
    left_out = [distinct_n(TEXTS[:i] + TEXTS[i + 1 :], 2) for i in range(len(TEXTS))]
    k = len(TEXTS)
    expected = math.sqrt((k - 1) / k * np.sum((np.array(left_out) - np.mean(left_out)) ** 2))
    assert se == pytest.approx(expected)


def _finite_cells(record):
    for rows in record["tables"].values():
        for row in rows:
            for key, entry in row.get("cells", {}).items():
                assert math.isfinite(entry["value"]), (row["method"], key)
                assert entry["se"] is not None and math.isfinite(entry["se"]), (row["method"], key)


def test_the_table_runs_at_tiny_size(tmp_path):
    argv = [
        "--task", "sentiment", "--num-samples", "2", "--particles", "2", "--steps", "4",
        "--seq-len", "16", "--no-gen-ppl", "--bootstrap", "20", "--out", str(tmp_path),
    ]  # fmt: skip
    record = table.main(argv)
    for suffix in (".md", ".json", "_samples.jsonl"):
        assert (tmp_path / f"sentiment_table{suffix}").is_file()
    rows = record["tables"]["equal-steps"]
    assert [r["key"] for r in rows] == table.METHODS
    assert all(r["n"] == 2 for r in rows)
    _finite_cells(json.loads((tmp_path / "sentiment_table.json").read_text()))
    assert "± " in (tmp_path / "sentiment_table.md").read_text()


def test_the_toxicity_table_matches_budgets(tmp_path):
    argv = [
        "--task", "toxicity", "--num-samples", "2", "--particles", "2", "--steps", "4",
        "--seq-len", "16", "--no-gen-ppl", "--bootstrap", "20", "--budget", "equal-nfe",
        "--methods", "base,smc_base,smc_grad,smc_amot", "--out", str(tmp_path),
    ]  # fmt: skip
    record = table.main(argv)
    rows = {r["key"]: r for r in record["tables"]["equal-nfe"]}
    # the packaged toxicity adapter; the amortized proposal costs 2 forwards a step: half the steps
    assert rows["smc_amot"]["method"] == "SMCamot (N=2)" and rows["smc_amot"]["num_steps"] == 2
    assert rows["base"]["num_steps"] == 8 and rows["smc_grad"]["num_steps"] == 4
    assert {r["nfe_budget"] for r in rows.values()} == {8}
    # SMCbase and SMCgrad already spend the budget at their steps: one configuration, not rerun
    assert rows["smc_base"]["same_as"] == rows["smc_grad"]["same_as"] == "equal-steps"
    assert "cells" not in rows["smc_grad"] and "same_as" not in rows["base"]
    _finite_cells(record)


def test_equal_nfe_rows_of_an_unchanged_configuration_show_its_equal_steps_cells(tmp_path):
    argv = [
        "--task", "sentiment", "--num-samples", "2", "--particles", "2", "--steps", "4",
        "--seq-len", "16", "--no-gen-ppl", "--bootstrap", "20", "--budget", "both",
        "--methods", "base,smc_base", "--out", str(tmp_path),
    ]  # fmt: skip
    record = table.main(argv)
    steps = {r["key"]: r for r in record["tables"]["equal-steps"]}
    nfe = {r["key"]: r for r in record["tables"]["equal-nfe"]}
    assert nfe["smc_base"]["same_as"] == "equal-steps" and "cells" in nfe["base"]
    assert nfe["base"]["num_steps"] == 8 and steps["base"]["num_steps"] == 4
    text = (tmp_path / "sentiment_table.md").read_text()
    equal_nfe = text.split("## Equal NFE")[1]
    reward = table.cell(steps["smc_base"]["cells"]["reward"], ".3f")
    assert f"| SMCbase (N=2) (= its equal-steps row: the same configuration) | 4 | {reward} |" in (
        equal_nfe
    )
    # the answers file holds the sampled rows only
    lines = (tmp_path / "sentiment_table_samples.jsonl").read_text().splitlines()
    keys = [(a["budget"], a["key"]) for a in map(json.loads, lines)]
    assert ("equal-nfe", "smc_base") not in keys and ("equal-nfe", "base") in keys


def _record(keys, wall_s):
    settings = {
        "command": f"part {keys}", "task": "toxicity", "num_samples": 2, "particles": 2,
        "seq_len": 16, "seed": 0, "bootstrap": 20, "gen_ppl": False, "reward": "r",
        "holdout": "h", "guide": "none", "adapter": "none", "wall_s": wall_s,
        "machine": "cpu", "torch": "x",
    }  # fmt: skip
    rows = [
        {"method": k, "key": k, "budget": "equal-steps", "nfe_budget": None, "num_steps": 4,
         "cells": {"reward": {"value": 0.5, "se": 0.1}, "ess": {"value": 1.0, "se": None}}}
        for k in keys
    ]  # fmt: skip
    return {"settings": settings, "tables": {"equal-steps": rows}}


def test_merge_joins_parts_in_method_order(tmp_path):
    parts = []
    for name, keys, wall in (("a", ["smc_grad"], 30.0), ("b", ["base", "smc_base"], 20.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_record(keys, wall)))
        sample = {"budget": "equal-steps", "key": keys[0], "index": 0, "text": "a b"}
        (tmp_path / f"{name}_samples.jsonl").write_text(json.dumps(sample) + "\n")
        parts.append(str(path))
    record = table.main(["--merge", *parts, "--out", str(tmp_path / "m"), "--name", "t"])
    assert [r["key"] for r in record["tables"]["equal-steps"]] == ["base", "smc_base", "smc_grad"]
    assert record["settings"]["wall_s"] == 30.0
    assert len((tmp_path / "m/t_samples.jsonl").read_text().splitlines()) == 2
    assert "0.500 ± 0.100" in (tmp_path / "m/t.md").read_text()
    # a merged table joins further parts; its commands stay one flat list
    extra = tmp_path / "e.json"
    extra.write_text(json.dumps(_record(["prop_grad"], 5.0)))
    again = table.main(["--merge", str(tmp_path / "m/t.json"), str(extra), "--out",
                        str(tmp_path / "m2"), "--name", "t"])  # fmt: skip
    assert all(isinstance(c, str) for c in again["settings"]["command"])
    assert len(again["settings"]["command"]) == 5
    assert [r["key"] for r in again["tables"]["equal-steps"]][-1] == "prop_grad"
    # merging into a part's own folder keeps that part's answers
    in_place = table.main(["--merge", str(tmp_path / "m/t.json"), str(extra), "--out",
                           str(tmp_path / "m"), "--name", "t"])  # fmt: skip
    assert len(in_place["tables"]["equal-steps"]) == 4
    assert len((tmp_path / "m/t_samples.jsonl").read_text().splitlines()) == 2
    clash = tmp_path / "c.json"
    clash.write_text(json.dumps(_record(["smc_base"], 1.0)))
    with pytest.raises(ValueError, match="appears twice"):
        table.main(["--merge", parts[1], str(clash), "--out", str(tmp_path / "x")])


def test_merge_recomputes_the_cells_of_a_sharded_method(tmp_path):
    parts = []
    for rank, reward in ((0, 0.2), (1, 0.6)):
        record = _record(["smc_base"], 10.0 + rank)
        record["settings"]["shard"] = [rank, 2]
        record["tables"]["equal-steps"][0]["sampling_s"] = 5.0
        record["tables"]["equal-steps"][0]["total_s"] = 6.0
        path = tmp_path / f"s{rank}.json"
        path.write_text(json.dumps(record))
        answer = {
            "budget": "equal-steps", "key": "smc_base", "index": rank, "reward": reward,
            "ess": 0.5, "nfe": 4.0, "seconds": 1.0, "text": f"word{rank} shared words here",
        }  # fmt: skip
        (tmp_path / f"s{rank}_samples.jsonl").write_text(json.dumps(answer) + "\n")
        parts.append(str(path))
    record = table.main(["--merge", *parts, "--out", str(tmp_path / "m"), "--name", "t"])
    (row,) = record["tables"]["equal-steps"]
    assert row["n"] == 2 and row["sampling_s"] == 10.0
    assert row["cells"]["reward"] == {"value": pytest.approx(0.4), "se": pytest.approx(0.2)}
    assert row["cells"]["dist1"]["value"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="not each of 0..1 once"):
        table.main(["--merge", parts[0], "--out", str(tmp_path / "x")])
