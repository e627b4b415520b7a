"""``python -m lightning_smc.sample``: one jsonargparse CLI over method configs, and the toy demo.

Every run here is CPU-small (``seq_len`` 16, 4 steps, 2 answers of 2 particles); the bad-input
cases assert the exception type and that the message names the option and the fix.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_smc.data.corpora import load_corpus
from lightning_smc.models import MDLMDenoiser
from lightning_smc.models.tokenizer import save_tokenizer, train_bpe
from lightning_smc.sample import SampleUsageError, load_model, main, sample_parser

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "configs/methods/embedded"
SRSMC, SMC_BASE = str(METHODS / "srsmc.yaml"), str(METHODS / "smc_base.yaml")
SMALL = ["--seq_len", "16", "--num_samples", "2", "--batch_size", "2",
         "--method.num_steps", "4", "--method.num_particles", "2"]  # fmt: skip
NO_SCORERS = ["--reward", "null", "--holdout", "null"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    spec = train_bpe(load_corpus("shakespeare", max_documents=2), vocab_size=300)
    save_tokenizer(spec.tokenizer, path)
    torch.manual_seed(0)
    model = MDLMDenoiser(
        vocab_size=spec.vocab_size,
        model_length=32,
        hidden_dim=32,
        cond_dim=16,
        n_blocks=1,
        n_heads=2,
    )
    model.save_pretrained(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------- --help, --print_config
def test_help_lists_every_option_with_its_doc(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    parser = sample_parser()
    shown = [a for a in parser._actions if a.help != "==SUPPRESS=="]
    for action in shown:
        assert action.option_strings[0] in out, action.option_strings
        assert (action.help or "").strip(), f"{action.option_strings[0]} has no doc"
    for option in ("--config", "--print_config", "--compare", "--nfe_budget", "--metrics",
                   "--gen_ppl", "--gen_ppl_model", "--out", "--device", "--prompt", "--model",
                   "--method.num_particles", "--method.select", "--seq_len"):  # fmt: skip
        assert option in out


def test_print_config_shows_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as done:
        main(
            [
                "--config",
                SRSMC,
                "--method.num_particles",
                "3",
                "--nfe_budget",
                "12",
                "--print_config",
            ]
        )
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["num_particles"] == 3 and printed["method"]["name"] == "SR-SMC"
    assert printed["nfe_budget"] == 12 and printed["out"] == "outputs/sample"


# ---------------------------------------------------------------------------------------- runs
def test_config_with_overrides_writes_finite_jsonl_and_summary(tmp_path):
    out = tmp_path / "out"
    summaries = main(["--config", SRSMC, *SMALL, "--metrics", "reward,entropy,ess,log_z,nfe",
                      "--out", str(out)])  # fmt: skip
    assert set(summaries) == {"SR-SMC"}
    row = summaries["SR-SMC"]
    assert (row["particles"], row["steps"]) == (2, 4)
    assert json.loads((out / "summary.json").read_text()) == summaries
    records = read_jsonl(out / "samples.jsonl")
    assert [r["index"] for r in records] == [0, 1]
    for r in records:
        assert len(r["tokens"]) == 16 and len(r["weights"]) == 2
        assert abs(sum(r["weights"]) - 1) < 1e-9 and math.isfinite(r["log_normalizer"])
    assert not list(out.glob("*.tmp"))  # written atomically


def test_model_and_prompt_overrides_replace_the_old_checkpoint_mode(checkpoint, tmp_path):
    summaries = main(["--config", SRSMC, *SMALL, *NO_SCORERS, "--model", str(checkpoint),
                      "--prompt", "To be", "--num_samples", "3", "--metrics", "entropy",
                      "--out", str(tmp_path)])  # fmt: skip
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert len(records) == 3 and all(r["text"].startswith("To be") for r in records)
    assert set(summaries["SR-SMC"]) == {"particles", "steps", "entropy", "entropy_se"}


def test_checkpoint_round_trip_matches_tokenizer(checkpoint):
    denoiser, spec = load_model(checkpoint)
    assert denoiser.vocab_size == spec.vocab_size and denoiser.mask_id == spec.mask_id


def test_compare_with_a_budget_and_the_old_dash_spellings(tmp_path):
    summaries = main(["--compare", SMC_BASE, SRSMC, *SMALL, "--nfe-budget", "8",
                      "--metrics", "reward,nfe", "--out", str(tmp_path)])  # fmt: skip
    assert list(summaries) == ["SMCbase", "SR-SMC"]
    assert all(row["steps"] == 4 for row in summaries.values())  # 8 NFE / 2 particles
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert [(r["method"], r["index"]) for r in records] == [
        (m, i) for m in ("SMCbase", "SR-SMC") for i in (0, 1)
    ]


def test_comparison_file_runs_relative_configs_and_the_command_line_wins(tmp_path):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods/sr.yaml").write_text(Path(SRSMC).read_text())
    comparison = tmp_path / "cmp.yaml"
    comparison.write_text(yaml.safe_dump({
        "overrides": ["--seq_len", "12"],
        "runs": [
            {"config": "methods/sr.yaml", "overrides": ["--method.name", "a", "--method.num_steps", "8"]},
            {"config": "methods/sr.yaml", "overrides": ["--method.name", "b"]},
        ],
    }))  # fmt: skip
    summaries = main(["--config", str(comparison), "--num_samples", "2", "--method.num_particles",
                      "2", "--method.num_steps", "4", *NO_SCORERS, "--metrics", "nfe",
                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert {k: v["steps"] for k, v in summaries.items()} == {"a": 4, "b": 4}
    assert all(len(r["tokens"]) == 12 for r in read_jsonl(tmp_path / "out/samples.jsonl"))


# ---------------------------------------------------------------------------- bad input (issue 12)
def test_toy_mode_moved_and_old_mode_options_name_their_new_spelling():
    for argv, expected in (
        (["--toy"], "experiments/toy_sample.py"),
        (["--checkpoint", "x"], "--model"),
        (["--particles", "4"], "--method.num_particles"),
        (["--steps", "4"], "--method.num_steps"),
        (["--unmasking", "random"], "--method.unmasking"),
        (["--cache"], "--method.cache true"),
    ):
        with pytest.raises(SampleUsageError, match=expected) as err:
            main(argv)
        assert argv[0] in str(err.value)


@pytest.mark.parametrize("flag", ["--seq_len", "--num_samples", "--unmasking", "--steps",
                                  "--checkpoint", "--seq-len"])  # fmt: skip
def test_toy_demo_refuses_flags_it_would_ignore(flag, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import toy_sample
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    with pytest.raises(SystemExit) as done:
        toy_sample.cli([flag, "4"])
    assert done.value.code == 2
    assert f"unrecognized arguments: {flag} 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num_steps 9: the toy has 6 tokens; use 1 to 6"):
        toy_sample.cli(["--num_steps", "9"])


@pytest.mark.parametrize("method", ["plain", "srsmc", "tilt"])
def test_toy_demo_prints_particles_and_exact_log_z(method):
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments/toy_sample.py"), "--method", method,
         "--num_particles", "4"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exact log Z" in done.stdout and "ESS after each step" in done.stdout


def test_best_of_n_selecting_by_weight_is_refused():
    with pytest.raises(SampleUsageError, match="select: weight returns particle 0") as err:
        main(["--config", str(METHODS / "best_of_n.yaml"), *SMALL, "--method.select", "weight"])
    assert "select: reward" in str(err.value)  # the field and the fix


def test_a_prompt_holding_the_mask_token_is_refused(tmp_path):
    with pytest.raises(SampleUsageError, match="--prompt contains the mask token") as err:
        main(["--config", SRSMC, *SMALL, *NO_SCORERS, "--prompt", "KING <|mask|> said",
              "--out", str(tmp_path)])  # fmt: skip
    assert "remove it" in str(err.value)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING\nthe <|mask|> queen\n")
    with pytest.raises(SampleUsageError, match=r"prompts.txt line 2 contains the mask token"):
        main(["--config", SRSMC, *SMALL, *NO_SCORERS, "--prompts", str(prompts)])
    assert not (tmp_path / "samples.jsonl").exists()


@pytest.mark.parametrize("value", ["lots", "0", "2.5"])
def test_a_bad_nfe_budget_names_the_option(value):
    with pytest.raises(
        SampleUsageError, match=f"--nfe_budget {value}: invalid value; expected a positive integer"
    ):
        main(["--config", SRSMC, "--nfe_budget", value])
    with pytest.raises(SampleUsageError, match=f"--nfe_budget {value}"):
        main(["--config", SRSMC, "--nfe-budget", value])  # the old spelling, same check


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/pretrain/mdlm_tiny.yaml"])
def test_a_training_config_is_sent_to_fit(config):
    with pytest.raises(SampleUsageError, match="is a `fit` \\(training\\) config") as err:
        main(["--config", str(ROOT / config)])
    assert f"python -m lightning_smc.fit --config {ROOT / config}" in str(err.value)


def test_bad_device_and_compare_with_a_comparison_file_are_named():
    with pytest.raises(SampleUsageError, match="--device tpu: invalid value; expected cpu or cuda"):
        main(["--config", SRSMC, "--device", "tpu"])
    with pytest.raises(SampleUsageError, match="--compare and a comparison file"):
        main(["--config", str(ROOT / "configs/eval/srsmc_genppl.yaml"), "--compare", SRSMC])


def test_bad_metrics_fail_before_any_model_is_loaded(tmp_path, monkeypatch):
    import lightning_smc.sample as sample

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the metrics were checked")

    monkeypatch.setattr(sample, "load_model", no_model)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown metric 'bogus'; choose from reward"):
        main(["--config", SMC_BASE, *SMALL, "--metrics", "reward,bogus", "--out", str(out)])
    with pytest.raises(ValueError, match="metric 'holdout' needs a holdout"):
        main(["--config", SMC_BASE, *SMALL, "--holdout", "null", "--metrics", "holdout"])
    missing = tmp_path / "missing_lm"
    with pytest.raises(OSError, match=f"metric 'gen_ppl'.*{missing.name}"):
        main(["--config", SMC_BASE, *SMALL, "--gen-ppl", "--gen-ppl-model", str(missing)])
    assert not out.exists()


def test_non_finite_values_are_never_written(tmp_path, monkeypatch):
    """A NaN metric or weight is an error naming the method and the metric; no file is written."""
    import lightning_smc.evaluation.report as report

    real = report.unigram_entropy
    monkeypatch.setattr(report, "unigram_entropy", lambda tokens: float("nan"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="method 'SR-SMC': entropy of answer 0 is not finite"):
        main(["--config", SRSMC, *SMALL, *NO_SCORERS, "--metrics", "nfe", "--out", str(out)])
    assert not out.exists()
    monkeypatch.setattr(report, "unigram_entropy", real)
    with pytest.raises(ValueError, match="method 'x': metric ess is not finite"):
        report.answer_records("x", None, {"ess": float("inf")})
