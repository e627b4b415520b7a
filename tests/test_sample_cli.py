"""``python -m lightning_smc.sample``: the toy demo and checkpoint loading."""

import pytest
import torch

from lightning_smc.data.corpora import load_corpus
from lightning_smc.data.tokenizer import save_tokenizer, train_bpe
from lightning_smc.models import MDLMDenoiser
from lightning_smc.sample import load_checkpoint, main


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
    denoiser, spec = load_checkpoint(checkpoint)
    assert denoiser.vocab_size == spec.vocab_size and denoiser.mask_id == spec.mask_id


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        main(["--checkpoint", str(tmp_path)])


def test_bad_counts_are_rejected():
    with pytest.raises(SystemExit):
        main(["--toy", "--particles", "0"])
