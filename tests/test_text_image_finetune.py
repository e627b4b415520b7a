"""Monetico fine-tuning: the at-scale config parses and names the missing hub pipeline; the
module fine-tunes a tiny Hub-layout pipeline for one step and exports it in that layout."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_text_cond import tiny_pipeline

from lightning_smc.fit import main
from lightning_smc.models.text_cond import load_text_image_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "meissonic_monetico_finetune.yaml"
CPU = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
    "--trainer.precision", "32-true",
]  # fmt: skip


def test_config_without_the_hub_pipeline_is_a_named_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["fit", "--config", str(CONFIG), *CPU, "--model.init_args.local_files_only", "true"]
    # (the CLI reports the module's FileNotFoundError inside its ValueError)
    with pytest.raises((FileNotFoundError, ValueError), match="huggingface-cli download Collov"):
        main(args)
    folder = ["--model.init_args.pretrained", str(tmp_path)]  # a folder, not a pipeline
    with pytest.raises((FileNotFoundError, ValueError), match=r"lacks \['transformer', 'vqvae'"):
        main([*args, *folder])


def test_one_step_on_a_tiny_pipeline_exports_the_hub_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny_pipeline(tmp_path / "pipe")
    data = tmp_path / "captions"
    data.mkdir()
    rng = np.random.default_rng(0)
    with (data / "metadata.jsonl").open("w") as f:
        for i, text in enumerate(["a cat", "a dog", "cat", "dog"]):
            Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    out = tmp_path / "exported"
    overrides = [
        *CPU, "--trainer.fast_dev_run", "1", "--trainer.num_nodes", "1",
        "--trainer.accumulate_grad_batches", "1",
        "--model.init_args.pretrained", str(tmp_path / "pipe"),
        "--model.init_args.resolution", "28", "--model.init_args.local_files_only", "true",
        "--model.init_args.min_masking_rate", "0.3", "--model.init_args.export_dir", str(out),
        "--data.init_args.root", str(data), "--data.init_args.resolution", "28",
        "--data.init_args.channels", "1", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0", "--data.init_args.val_fraction", "0.25",
    ]  # fmt: skip
    before = load_text_image_model(tmp_path / "pipe", resolution=28, local_files_only=True)
    cli = main(["fit", "--config", str(CONFIG), *overrides])
    assert cli.trainer.global_step == 1
    after = load_text_image_model(out, resolution=28, local_files_only=True)
    changed = [
        k
        for k, v in after.transformer.state_dict().items()
        if not torch.equal(v, before.transformer.state_dict()[k])
    ]
    assert changed, "the transformer did not train"
    for part in ("vq", "text"):  # frozen
        a, b = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert all(torch.equal(v, b[k]) for k, v in a.items())
