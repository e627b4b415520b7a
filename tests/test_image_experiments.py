"""The image experiment scripts of issue 15 at tiny size: SMC columns of
experiments/image_cfg_table.py and experiments/image_reward_table.py (plumbing, files, SEs,
equal-NFE step matching), on the random tiny image model."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from tolerance import rounding_tolerance  # noqa: E402

from lightning_smc.data.images import DEFAULT_ROOT, missing_data_message  # noqa: E402
from lightning_smc.evaluation.images import sample_images  # noqa: E402
from lightning_smc.methods import Method, ProductTargetSpec  # noqa: E402
from lightning_smc.models.image import load_image_model  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def need_data():
    missing = [f for f in ("t10k-images-idx3-ubyte.gz",) if not (Path(DEFAULT_ROOT) / f).is_file()]
    if missing:
        pytest.skip(missing_data_message(DEFAULT_ROOT, missing))


# ---------------------------------------------------------------------- image_cfg_table
def test_n1_methods_are_the_committed_plain_cfg_sampler_token_for_token():
    """--particles leaves N = 1 as it was: the same Method (ancestral, no ESS rule), hence the
    same tokens for the same seeds as the committed table's definition."""
    import image_cfg_table

    model = load_image_model("random_tiny_image")
    labels = torch.arange(10).repeat_interleave(2)
    for weight in (1.0, 1.5):
        committed = Method(  # the committed script's cfg_method, verbatim in its fields
            name=f"CFG {weight:g}, 2 steps",
            num_particles=1,
            num_steps=2,
            unmasking="ancestral",
            schedule="maskgit_cosine",
            potential=None
            if weight == 1.0
            else ProductTargetSpec(weight=weight, second_cond=model.null_class),
        )
        new = image_cfg_table.cfg_method(weight, 2, model.null_class, particles=1)
        assert new == committed
        a = sample_images(new, model, labels, seed=3, batch_size=7)
        b = sample_images(committed, model, labels, seed=3, batch_size=20)
        assert torch.equal(a.tokens, b.tokens)
    smc = image_cfg_table.cfg_method(1.5, 2, model.null_class, particles=2)
    assert (smc.unmasking, smc.num_particles, smc.ess_threshold) == ("remdm", 2, 0.5)
    assert smc.name == "CFG 1.5, 2 steps, N=2 (ReMDM)"
    with pytest.raises(ValueError, match="weight 1 with 2 particles"):
        image_cfg_table.cfg_method(1.0, 2, model.null_class, particles=2)


def test_cfg_table_smc_rows_files_and_merge(tmp_path):
    need_data()
    import image_cfg_table

    common = ["--model", "random_tiny_image", "--per-class", "1", "--steps", "2", "--weights",
              "1.5", "--splits", "2", "--reference-size", "40", "--batch-size", "4"]  # fmt: skip
    part_a, part_b = tmp_path / "a", tmp_path / "b"
    a = image_cfg_table.main(common + ["--particles", "1", "--out", str(part_a)])
    b = image_cfg_table.main(common + ["--particles", "2", "--no-real", "--out", str(part_b)])
    assert [r["setting"] for r in a["rows"]] == ["real (train, n=10)", "CFG 1.5, 2 steps"]
    (smc,) = b["rows"]
    assert smc["setting"] == "CFG 1.5, 2 steps, N=2 (ReMDM)" and smc["particles"] == 2
    # the product target costs 2 evaluations per particle per step: 2 x 2 x 2
    assert smc["nfe"] == 8 and smc["nfe_se"] == 0
    assert 0.5 <= smc["ess"] <= 1 and smc["ess_se"] >= 0
    assert a["rows"][1]["ess"] == 1 and a["rows"][1]["nfe"] == 4
    assert (part_b / "grid_w1.5_s2_n2_remdm.png").is_file()
    assert (part_a / "grid_w1.5_s2.png").is_file()
    merged = image_cfg_table.main(
        ["--merge", str(part_b / "image_cfg_table.json"), str(part_a / "image_cfg_table.json"),
         "--out", str(tmp_path / "m")]
    )  # fmt: skip
    assert [r["setting"] for r in merged["rows"]] == [
        "real (train, n=10)",
        "CFG 1.5, 2 steps",
        "CFG 1.5, 2 steps, N=2 (ReMDM)",
    ]
    assert (tmp_path / "m" / "grid_w1.5_s2_n2_remdm.png").is_file()
    assert (tmp_path / "m" / "grid_w1.5_s2.png").is_file()
    text = (tmp_path / "m" / "image_cfg_table.md").read_text()
    assert "| CFG 1.5, 2 steps, N=2 (ReMDM) | 2 | 8 |" in text
    with pytest.raises(ValueError, match="appears in two parts"):
        image_cfg_table.main(
            ["--merge", str(part_b / "image_cfg_table.json"), str(part_b / "image_cfg_table.json"),
             "--out", str(tmp_path / "m2")]
        )  # fmt: skip


def test_cfg_table_resume_reuses_finished_batches_and_refuses_another_runs(tmp_path, monkeypatch):
    """An interrupted cell continues from its saved batches: with one batch file missing,
    --resume samples only that batch and gives the uninterrupted run's row; a batch made with
    another seed is refused by name; without --resume every batch is redone."""
    need_data()
    import image_cfg_table

    out = tmp_path / "run"
    common = ["--model", "random_tiny_image", "--per-class", "1", "--steps", "2", "--weights",
              "1.5", "--particles", "2", "--no-real", "--splits", "2", "--reference-size", "40",
              "--batch-size", "4", "--out", str(out)]  # fmt: skip
    (full,) = image_cfg_table.main(common)["rows"]
    folder = out / "blocks" / "grid_w1.5_s2_n2_remdm"
    assert sorted(f.name for f in folder.iterdir()) == ["000000.pt", "000004.pt", "000008.pt"]
    calls = []
    real = image_cfg_table.sample_images

    def counting(method, model, labels, **kw):
        calls.append(kw["offset"])
        return real(method, model, labels, **kw)

    monkeypatch.setattr(image_cfg_table, "sample_images", counting)
    (folder / "000004.pt").unlink()
    (resumed,) = image_cfg_table.main(common + ["--resume"])["rows"]
    assert calls == [4]
    timing = {"seconds", "seconds_se"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in full.items() if k not in timing
    }
    with pytest.raises(ValueError, match=r"000000\.pt holds another run's batch .*seed 0"):
        image_cfg_table.main(common + ["--resume", "--seed", "1"])
    calls.clear()
    image_cfg_table.main(common)
    assert calls == [0, 4, 8]
    (folder / "000004.pt").write_bytes((folder / "000004.pt").read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"000004\.pt cannot be read as a saved batch"):
        image_cfg_table.main(common + ["--resume"])
    for other in (["--merge", str(out / "image_cfg_table.json")], ["--diagnostic"]):
        with pytest.raises(SystemExit):
            image_cfg_table.main(common + ["--resume"] + other)


def test_particle_diagnostic_best_is_the_tables_answer_and_weighted_uses_the_weights():
    """--diagnostic scores the same particles as the table: its best-particle accuracy is the
    accuracy of sample_images' answers (same seeds), and the weighted / uniform columns are
    the normalized-weight and plain means of the per-particle scores."""
    import image_cfg_table

    from lightning_smc.metrics.classifier import load_classifier
    from lightning_smc.metrics.image import class_accuracy, to_uint8

    model = load_image_model("embedded_image")  # the random model's weights are near-uniform
    labels = torch.arange(10).repeat_interleave(2)
    method = image_cfg_table.cfg_method(2.0, 4, model.null_class, particles=4)
    row = image_cfg_table.particle_diagnostic(model, method, labels, seed=5, batch_size=20)
    table = sample_images(method, model, labels, seed=5, batch_size=20)
    assert row["accuracy_best"] == pytest.approx(class_accuracy(table.images, labels), abs=1e-12)
    clf = load_classifier("fmnist_classifier_tiny")
    with torch.no_grad():
        logp = clf(to_uint8(table.images).float().div(255.0)).log_softmax(-1)
    expected = logp.gather(-1, labels.view(-1, 1)).double().mean()
    # the same images in a batch of another size: rounding of the classifier's widest sum only
    fan_in = max(p[0].numel() for p in clf.parameters() if p.dim() > 1)
    tol = rounding_tolerance(fan_in, float(logp.abs().max()) + 1.0, ulps=4)
    assert row["log_p_best"] == pytest.approx(float(expected), abs=tol)
    assert row["n"] == 20 and row["particles"] == 4 and 0 < row["ess"] <= 1
    assert -1 <= row["corr"] <= 1 and 0 <= row["corr_n"] <= 20
    # the weights are not uniform at w = 2 (else weighted would equal uniform by construction)
    assert row["ess"] < 1
    for key in ("accuracy", "log_p"):
        assert min(row[f"{key}_best"], row[f"{key}_weighted"], row[f"{key}_uniform"]) > -math.inf
    assert row["log_p_weighted"] != row["log_p_uniform"]
    with pytest.raises(ValueError, match="N >= 2"):
        image_cfg_table.particle_diagnostic(
            model, image_cfg_table.cfg_method(1.5, 2, model.null_class), labels
        )


# ---------------------------------------------------------------------- image_reward_table
def zero_adapter(folder):
    """A zero-initialised adapter of the random tiny image model (proposes exactly as base)."""
    from lightning_smc.models import LoRADenoiser

    lora = LoRADenoiser(load_image_model("random_tiny_image").denoiser, 4, 4.0, ATTENTION)
    return lora.save_adapter(folder)


def test_mean_se_is_std_over_sqrt_n():
    from image_reward_table import mean_se

    x = np.array([1.0, 2.0, 4.0, 7.0])
    value, se = mean_se(x)
    assert value == 3.5
    assert se == pytest.approx(math.sqrt(((x - 3.5) ** 2).sum() / 3) / 2)


def test_equal_nfe_matches_smc_base_spend():
    import image_reward_table as t

    args = t.parse_args(["--model", "random_tiny_image", "--num-samples", "8", "--particles", "4",
                         "--steps", "6", "--adapter", "unused"])  # fmt: skip
    budget = t.nfe_budget(args)
    assert budget == 4 * 6  # SMCbase: N x steps x 1 evaluation
    steps = {name: t.load_run(name, args, budget).method.num_steps for name in t.METHODS}
    # base / Propgrad: one particle, 1 evaluation; best-of / SMCbase / SMCgrad: 4 particles;
    # SMCamot: 4 particles x 2 evaluations; Propamot: 1 particle x 2
    assert steps == {"base": 24, "best_of_n": 6, "smc_base": 6, "smc_grad": 6, "smc_amot": 3,
                     "prop_grad": 24, "prop_amot": 12}  # fmt: skip
    with pytest.raises(SystemExit):
        t.parse_args(["--methods", "smc_base,nope"])


def test_reward_table_runs_every_method_and_both_budgets(tmp_path):
    need_data()
    import image_reward_table as t

    adapter = zero_adapter(tmp_path / "adapter")
    common = ["--model", "random_tiny_image", "--num-samples", "4", "--particles", "2",
              "--steps", "2", "--splits", "2", "--batch-size", "4",
              "--adapter", str(adapter)]  # fmt: skip
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    a = t.main(common + ["--budget", "both", "--methods", "base,best_of_n,smc_base,smc_amot",
                         "--out", str(out_a)])  # fmt: skip
    b = t.main(common + ["--budget", "equal-nfe", "--methods", "smc_grad,prop_grad,prop_amot",
                         "--out", str(out_b)])  # fmt: skip
    steps = {r["key"]: r["num_steps"] for r in a["tables"]["equal-nfe"] + b["tables"]["equal-nfe"]}
    assert steps == {"base": 4, "best_of_n": 2, "smc_base": 2, "smc_amot": 1, "smc_grad": 2,
                     "prop_grad": 4, "prop_amot": 2}  # fmt: skip
    for row in a["tables"]["equal-steps"] + a["tables"]["equal-nfe"] + b["tables"]["equal-nfe"]:
        cells = row["cells"]
        assert row["n"] == 4 and -10 <= cells["reward"]["value"] <= 0
        for key in ("reward", "success", "holdout", "holdout_success", "ess", "seconds"):
            assert cells[key]["se"] is not None and cells[key]["se"] >= 0, (row["key"], key)
        assert 0 <= cells["accuracy"]["value"] <= 1 and cells["fid_split"]["se"] is not None
        particles = 1 if row["key"] in ("base", "prop_grad", "prop_amot") else 2
        assert row["num_particles"] == particles
        evals = 2 if "amot" in row["key"] else 1
        assert cells["nfe"]["value"] == particles * row["num_steps"] * evals
        grid = (out_a if row in a["tables"].get(row["budget"], []) else out_b) / row["grid"]
        assert grid.is_file() and grid.stat().st_size < 100_000
    by_steps = {r["key"]: r for r in a["tables"]["equal-steps"]}
    by_nfe = {r["key"]: r for r in a["tables"]["equal-nfe"]}
    # equal NFE at the same steps is the same run: reused, not sampled twice
    assert (
        by_nfe["smc_base"]["reused"]
        and by_nfe["smc_base"]["cells"] == by_steps["smc_base"]["cells"]
    )
    assert "reused" not in by_nfe["base"] and (out_a / "grid_equal-nfe_smc_base.png").is_file()
    # a zero adapter proposes as the base model: SMCamot draws SMCbase's images, seed for seed
    for key in ("reward", "holdout", "ess", "fid"):
        assert by_steps["smc_amot"]["cells"][key] == by_steps["smc_base"]["cells"][key]
    # success is reward > log 1/2, SE its binomial std(ddof=1) / sqrt(n)
    base = a["tables"]["equal-steps"][0]
    p = base["cells"]["success"]["value"]
    assert base["cells"]["success"]["se"] == pytest.approx(math.sqrt(p * (1 - p) * 4 / 3 / 4))
    parts = [str(out_a / "image_reward_table.json"), str(out_b / "image_reward_table.json")]
    merged = t.main(["--merge", *parts, "--out", str(tmp_path / "m")])
    assert [r["key"] for r in merged["tables"]["equal-nfe"]] == t.METHODS
    steps_keys = [r["key"] for r in merged["tables"]["equal-steps"]]
    assert steps_keys == ["base", "best_of_n", "smc_base", "smc_amot"]
    text = (tmp_path / "m" / "image_reward_table.md").read_text()
    assert "| SMCamot (N=2) | 1 |" in text and "## Equal NFE (budget 4 " in text
    assert (tmp_path / "m" / "grid_equal-nfe_prop_amot.png").is_file()
    with pytest.raises(ValueError, match="appears in two parts"):
        t.main(["--merge", str(out_a / "image_reward_table.json"),
                str(out_a / "image_reward_table.json"), "--out", str(tmp_path / "m2")])  # fmt: skip
