"""experiments/srsmc_frontier.py: its standard errors, a tiny smoke run and the report / plot."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tolerance import rounding_tolerance

_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "srsmc_frontier.py"
_spec = importlib.util.spec_from_file_location("srsmc_frontier", _SCRIPT)
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def test_ratio_ppl_se_matches_the_delta_method_on_the_covariance():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(20, 80, (50,), generator=g).double()
    a = b * (5.0 + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)) + torch.randn(
        50, generator=g, dtype=torch.float64
    )
    ppl, se = frontier.ratio_ppl_se(a, b)
    n = a.numel()
    # brute force: log ppl = f(mean a, mean b) = mean a / mean b; Var = grad^T Cov grad / n
    ma, mb = a.mean(), b.mean()
    cov = torch.cov(torch.stack([a, b]))  # ddof = 1
    grad = torch.stack([1 / mb, -ma / mb**2])
    se_log = math.sqrt(float(grad @ cov @ grad) / n)
    assert ppl == pytest.approx(math.exp(float(a.sum() / b.sum())), rel=1e-12)
    assert se == pytest.approx(ppl * se_log, rel=1e-10)


def test_ratio_ppl_se_known_cases():
    # equal token counts: log ppl is the mean of a / b, its SE std(a)/sqrt(n)/b
    a = torch.tensor([10.0, 12.0, 14.0, 20.0])
    b = torch.full((4,), 4.0)
    ppl, se = frontier.ratio_ppl_se(a, b)
    assert ppl == pytest.approx(math.exp(56 / 16))
    assert se == pytest.approx(ppl * float(a.std()) / 2 / 4)
    # every sample with the same NLL per token: no spread at all
    ppl, se = frontier.ratio_ppl_se([3.0, 6.0, 9.0], [1, 2, 3])
    assert ppl == pytest.approx(math.exp(3.0)) and se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        frontier.ratio_ppl_se([1.0], [1])


def test_mean_se():
    mean, se = frontier.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)


def test_equal_nfe_points_spend_the_base_budget():
    grid = {p["key"]: p for p in frontier.make_grid("full")}
    assert len(grid) == 6 + 3 + 16
    for key, steps in [("srsmc-n4-b1.0-nfe", 16), ("srsmc-n8-b0.5-nfe", 8)]:
        method = frontier.point_method(grid[key], 64)
        assert method.num_steps == steps and method.num_particles * method.num_steps == 64
    base = frontier.point_method(grid["temp0.7"], 64)
    assert base.potential is None and base.num_particles == 1 and base.temperature == 0.7
    srsmc = frontier.point_method(grid["srsmc-n8-b2.0-steps"], 64)
    assert srsmc.num_steps == 64 and srsmc.potential.beta == 2.0
    assert {p["key"] for p in frontier.make_grid("run")} <= set(grid)


def test_smoke_run_writes_finite_results(tmp_path):
    argv = ["--num-samples", "2", "--steps", "4", "--seq-len", "16", "--gen-ppl", "0",
            "--points", "temp0.7,srsmc-n4-b1.0-nfe", "--out", str(tmp_path)]  # fmt: skip
    rows = frontier.main(argv)
    assert [r["key"] for r in rows] == ["temp0.7", "srsmc-n4-b1.0-nfe"]
    for name in ("srsmc_frontier.md", "srsmc_frontier.json"):
        assert (tmp_path / name).is_file()
    data = json.loads((tmp_path / "srsmc_frontier.json").read_text())
    for point in data["points"]:
        assert point["n"] == 2
        for key in ("entropy", "entropy_se", "nfe", "seconds_per_answer"):
            assert math.isfinite(point[key])
    assert data["points"][1]["steps"] == 1 and data["points"][1]["nfe"] == 4
    assert "| base, T = 0.7 |" in (tmp_path / "srsmc_frontier.md").read_text()


def test_report_and_plot_from_point_files(tmp_path):
    (tmp_path / "points").mkdir()
    grid = {p["key"]: p for p in frontier.make_grid("full")}
    for i, key in enumerate(["temp1.0", "temp0.5", "srsmc-n4-b1.0-steps", "srsmc-n4-b1.0-nfe"]):
        row = dict(grid[key], steps=64, n=128, seq_len=64, seed=0, nfe=64, ess=1.0,
                   entropy=3.7 - 0.1 * i, entropy_se=0.01, gen_ppl=800.0 - 100 * i,
                   gen_ppl_se=40.0, dist_2=0.9, seconds_per_answer=1.0)  # fmt: skip
        (tmp_path / "points" / f"{key}.json").write_text(json.dumps(row))
    rows = frontier.main(["--report-only", "--out", str(tmp_path)])
    assert len(rows) == 4
    png = tmp_path / "srsmc_frontier.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert "800.0 ± 40.0" in (tmp_path / "srsmc_frontier.md").read_text()


def test_temperature_curve_interpolates_log_ppl():
    rows = [
        dict(family="temperature", entropy=3.0, gen_ppl=100.0),
        dict(family="temperature", entropy=4.0, gen_ppl=10000.0),
        dict(family="SR-SMC N=4", entropy=3.5, gen_ppl=1.0),
    ]
    assert frontier.temperature_curve(rows, 3.5) == pytest.approx(1000.0)
    assert frontier.temperature_curve(rows, 4.5) is None


def test_restore_rebuilds_the_point_files_of_a_report(tmp_path):
    first = tmp_path / "first"
    argv = ["--num-samples", "2", "--steps", "4", "--seq-len", "16", "--gen-ppl", "0",
            "--points", "temp0.7,srsmc-n4-b1.0-nfe", "--out", str(first)]  # fmt: skip
    frontier.main(argv)
    report = first / "srsmc_frontier.json"
    second = tmp_path / "second"
    rows = frontier.main(["--restore", str(report), "--report-only", "--out", str(second)])
    assert [r["key"] for r in rows] == ["temp0.7", "srsmc-n4-b1.0-nfe"]
    # the rebuilt report is the original one (per-sample values included)
    assert (second / "srsmc_frontier.md").read_text() == (first / "srsmc_frontier.md").read_text()
    restored = json.loads((second / "points" / "temp0.7.json").read_text())
    assert (
        restored["per_sample_entropy"]
        == json.loads(report.read_text())["per_sample"]["temp0.7"]["per_sample_entropy"]
    )
    # points already on disk are kept, not overwritten
    assert frontier.restore_points(report, second) == []
    with pytest.raises(SystemExit, match="--restore"):
        frontier.restore_points(tmp_path / "missing.json", second)


def test_srsmc_points_use_the_logit_cache_without_changing_samples():
    import dataclasses

    from lightning_smc.evaluation import run_method
    from lightning_smc.models.loading import load_model

    denoiser, spec = load_model("embedded")
    grid = {p["key"]: p for p in frontier.make_grid("full")}
    method = frontier.point_method(grid["srsmc-n4-b1.0-steps"], 8)
    assert method.cache
    kwargs = dict(num_samples=2, seq_len=16, batch_size=2, seed=3)
    cached = run_method(method, denoiser, spec.tokenizer, **kwargs)
    plain = run_method(dataclasses.replace(method, cache=False), denoiser, spec.tokenizer, **kwargs)
    assert torch.equal(cached.tokens, plain.tokens)
    # the weights agree up to rounding: the cache evaluates fewer rows per call, and another
    # batch composition may round differently (a few ulps per log-probability summed: 8 steps
    # x 16 positions, each at most the largest |log w|)
    scale = float(plain.log_weights.abs().max())
    tol = rounding_tolerance(num_terms=8 * 16, magnitude=scale, ulps=16)
    assert torch.allclose(cached.log_weights, plain.log_weights, rtol=0, atol=tol)
    assert cached.nfe < plain.nfe
