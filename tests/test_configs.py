"""Every config under configs/ parses and smoke-runs (fast_dev_run) through the real CLI."""

from pathlib import Path

import pytest
import torch

from lightning_smc.export import export
from lightning_smc.fit import main
from lightning_smc.models import MDLMDenoiser
from lightning_smc.sample import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# Real configs shrunk to CPU size (the at-scale ones point at hub data and GPUs).
SMOKE = ["--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
         "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.num_nodes", "1",
         "--data.init_args.corpus", "shakespeare", "--data.init_args.tokenizer", "null",
         "--data.init_args.num_workers", "0",
         "--data.init_args.max_documents", "4", "--data.init_args.vocab_size", "300",
         "--data.init_args.batch_size", "2", "--data.init_args.seq_len", "32"]


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML file"


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_smoke_runs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    shrink = ["--model.init_args.denoiser.init_args.vocab_size", "300",
              "--model.init_args.denoiser.init_args.model_length", "32"]
    cli = main(["fit", "--config", str(config), *SMOKE, *shrink])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


def test_offline_wandb_run_records_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = SMOKE[2:]  # everything but fast_dev_run, which disables loggers
    cli = main(["fit", "--config", str(ROOT / "configs/pretrain/mdlm_tiny.yaml"), *args,
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
          "--model.init_args.denoiser.init_args.vocab_size", "300"])
    run_dir = Path(cli.trainer.logger.experiment.dir).resolve().parent
    cli.trainer.logger.experiment.finish()  # flush this offline run to disk
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    history = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
    assert b"train/loss" in history and b"val/nll" in history
    assert (tmp_path / "outputs/mdlm_tiny/hf/model.safetensors").exists()
    run = tmp_path / "outputs/mdlm_tiny"
    assert (run / "config.yaml").exists() and not (tmp_path / "config.yaml").exists()
    # Exporting last.ckpt gives the same model and tokenizer as fit's own export.
    export(run / "config.yaml", run / "checkpoints/last.ckpt", tmp_path / "exported")
    a, b = MDLMDenoiser.from_pretrained(run / "hf"), MDLMDenoiser.from_pretrained(tmp_path / "exported")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert load_checkpoint(tmp_path / "exported")[1].vocab_size == a.vocab_size


def test_unknown_config_key_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS[0]), "--model.init_args.no_such_key", "1"])
    assert "no_such_key" in capsys.readouterr().err
