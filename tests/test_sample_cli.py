"""``python -m lightning_smc.sample``: the toy demo and checkpoint loading."""

import json
from pathlib import Path

import pytest
import torch

from lightning_smc.data.corpora import load_corpus
from lightning_smc.models import MDLMDenoiser
from lightning_smc.models.tokenizer import save_tokenizer, train_bpe
from lightning_smc.sample import load_model, main


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


@pytest.mark.parametrize("method", ["plain", "srsmc", "tilt"])
def test_toy_demo_prints_particles_and_exact_log_z(method, capsys):
    main(["--toy", "--method", method, "--particles", "4"])
    out = capsys.readouterr().out
    assert "exact log Z" in out and "ESS after each step" in out


def test_checkpoint_samples_print_decoded_text_and_weights(checkpoint, capsys):
    main(
        [
            "--checkpoint",
            str(checkpoint),
            "--particles",
            "3",
            "--steps",
            "4",
            "--seq-len",
            "12",
            "--num-samples",
            "2",
            "--prompt",
            "To be",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("sample ") >= 2 and "To be" in out and "NFE per sequence" in out


def test_checkpoint_round_trip_matches_tokenizer(checkpoint):
    denoiser, spec = load_model(checkpoint)
    assert denoiser.vocab_size == spec.vocab_size and denoiser.mask_id == spec.mask_id


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        main(["--checkpoint", str(tmp_path)])


def test_bad_counts_are_rejected():
    with pytest.raises(SystemExit):
        main(["--toy", "--particles", "0"])


# ------------------------------------------------------------------ --metrics
ROOT = Path(__file__).resolve().parents[1]
SMC_BASE = str(ROOT / "configs/methods/embedded/smc_base.yaml")
SMALL = ["--seq_len", "8", "--num_samples", "3", "--method.num_steps", "4",
         "--method.num_particles", "2"]  # fmt: skip


def test_metrics_are_selected_by_name(tmp_path):
    summaries = main(
        [
            "--config",
            SMC_BASE,
            *SMALL,
            "--metrics",
            "log_z,overtakes,entropy",
            "--out",
            str(tmp_path),
        ]
    )
    # every:8 never resamples in 4 steps: overtakes per resample is undefined, so left out
    assert set(summaries["SMCbase"]) == {
        "particles", "steps", "log_z_mean", "log_z_var", "overtakes", "entropy",
    }  # fmt: skip
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summaries
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(len(r["weights"]) == 2 for r in records)


def test_bad_metrics_fail_before_any_model_is_loaded(tmp_path, monkeypatch):
    import lightning_smc.methods as methods

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the metrics were checked")

    monkeypatch.setattr(methods, "load_model", no_model)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown metric 'bogus'; choose from reward"):
        main(["--config", SMC_BASE, *SMALL, "--metrics", "reward,bogus", "--out", str(out)])
    with pytest.raises(ValueError, match="metric 'holdout' needs a holdout"):
        main(["--config", SMC_BASE, *SMALL, "--holdout", "null", "--metrics", "holdout"])
    missing = tmp_path / "missing_lm"
    with pytest.raises(OSError, match=f"metric 'gen_ppl'.*{missing.name}"):
        main(["--config", SMC_BASE, *SMALL, "--gen-ppl", "--gen-ppl-model", str(missing)])
    with pytest.raises(ValueError, match="--device 'tpu'"):
        main(["--config", SMC_BASE, *SMALL, "--device", "tpu"])
    assert not out.exists()
