"""Safe, named loading (issue 12 item 4) and the ``fit`` inputs that must not pass silently.

- a pickle that would run code is refused by ``export``, ``fit --ckpt_path`` and every loader,
  and the code never runs (a marker file it would write stays absent);
- a corrupted checkpoint, ``model.safetensors``, ``config.json`` or adapter file fails with an
  error that names the file and never suggests ``weights_only=False``;
- ``fit`` with no optimizer step exports nothing and says so; a sampling config given to ``fit``
  is refused with the ``sample`` command to run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lightning_smc.export import export
from lightning_smc.export import main as export_main
from lightning_smc.fit import SafeCheckpointIO
from lightning_smc.fit import main as fit_main
from lightning_smc.models import LoRADenoiser, MDLMDenoiser
from lightning_smc.models.loading import (
    EMBEDDED,
    EMBEDDED_ADAPTER,
    EMBEDDED_REWARD,
    load_denoiser,
    load_model,
    read_checkpoint,
)
from lightning_smc.rewards import LearnedReward

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=300, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2)
UNSAFE = "weights_only=False"
LoadError = (OSError, ValueError, pickle.UnpicklingError)


class _RunsCode:
    """Unpickling this calls ``exec``: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def evil_file(path: Path, marker: Path) -> Path:
    """A torch.save'd checkpoint (with a plausible ``state_dict``) whose pickle runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"denoiser.w": torch.zeros(2)}, "x": _RunsCode(marker)}, path)
    return path


def random_bytes(path: Path, n: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(n))
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def assert_named(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert str(path) in message, message
    assert UNSAFE not in message, message


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A save_pretrained folder of a tiny MDLM (no tokenizer)."""
    torch.manual_seed(0)
    return MDLMDenoiser(**TINY).save_pretrained(tmp_path / "model")


def adapter_dir(tmp_path: Path) -> tuple[MDLMDenoiser, Path]:
    """A saved LoRA adapter and a fresh copy of the base it was trained on."""

    def base() -> MDLMDenoiser:
        torch.manual_seed(0)
        return MDLMDenoiser(**TINY)

    directory = LoRADenoiser(base(), rank=2).save_adapter(tmp_path / "adapter")
    return base(), directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """One trained BPE for every fit in this file."""
    return tmp_path_factory.mktemp("loading") / "tok"


def fit_config(tmp_path: Path, tokenizer_dir: Path | None = None) -> Path:
    """configs/pretrain/mdlm_tiny.yaml shrunk to CPU seconds (as tests/test_pretrain.py)."""
    cfg = yaml.safe_load((ROOT / "configs/pretrain/mdlm_tiny.yaml").read_text())
    cfg["trainer"].update(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / "run"),
    )
    cfg["model"]["init_args"]["denoiser"]["init_args"].update(TINY)
    cfg["model"]["init_args"]["warmup_steps"] = 0
    cfg["data"]["init_args"].update(
        max_documents=4, vocab_size=300, seq_len=32, batch_size=4,
        tokenizer_dir=str(tokenizer_dir or tmp_path / "tok"),
    )  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- 1. a pickle that runs code is refused everywhere, and never runs --------------------------
def test_a_code_running_pickle_is_refused_by_every_loader(tmp_path, model_dir):
    marker = tmp_path / "PWNED"
    ckpt = evil_file(tmp_path / "evil.ckpt", marker)

    with pytest.raises(pickle.UnpicklingError, match="calls exec") as err:
        read_checkpoint(ckpt)
    assert_named(err, ckpt)

    with pytest.raises(pickle.UnpicklingError) as err:  # fit --ckpt_path (Lightning's loader)
        SafeCheckpointIO().load_checkpoint(ckpt)
    assert_named(err, ckpt)

    (model_dir / "model.safetensors").unlink()  # the denoiser falls back to pytorch_model.bin
    weights = evil_file(model_dir / "pytorch_model.bin", marker)
    for load in (MDLMDenoiser.from_pretrained, load_denoiser):
        with pytest.raises(pickle.UnpicklingError) as err:
            load(model_dir)
        assert_named(err, weights)
    with pytest.raises(pickle.UnpicklingError) as err:
        load_model(model_dir, tokenizer=EMBEDDED)
    assert_named(err, weights)

    base, adapter = adapter_dir(tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    bin_path = evil_file(adapter / "adapter_model.bin", marker)
    with pytest.raises(pickle.UnpicklingError) as err:
        LoRADenoiser.from_adapter(base, adapter)
    assert_named(err, bin_path)
    assert not marker.exists(), "the checkpoint's code ran"


def test_export_refuses_a_code_running_checkpoint(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt = evil_file(tmp_path / "evil.ckpt", marker)
    config = fit_config(tmp_path)
    with pytest.raises(pickle.UnpicklingError) as err:
        export(config, ckpt, tmp_path / "out")
    assert_named(err, ckpt)
    with pytest.raises(SystemExit) as exit_:  # python -m lightning_smc.export --ckpt evil.ckpt
        export_main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    assert str(ckpt) in stderr and "refused" in stderr and UNSAFE not in stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- 2. corrupted files: every error names the file ---------------------------------------------
@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_corrupted_checkpoint_is_named(tmp_path, damage):
    if damage == "random":
        ckpt = random_bytes(tmp_path / "bad.ckpt")
    else:
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "bad.ckpt")
        ckpt = truncate(tmp_path / "bad.ckpt")
    for load in (read_checkpoint, SafeCheckpointIO().load_checkpoint):
        with pytest.raises(ValueError, match="PyTorch checkpoint") as err:
            load(ckpt)
        assert_named(err, ckpt)
    with pytest.raises(ValueError) as err:
        export(fit_config(tmp_path), ckpt, tmp_path / "out")
    assert_named(err, ckpt)


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_corrupted_model_safetensors_is_named(tmp_path, model_dir, damage):
    weights = model_dir / "model.safetensors"
    random_bytes(weights) if damage == "random" else truncate(weights)
    for load in (MDLMDenoiser.from_pretrained, load_denoiser):
        with pytest.raises(ValueError, match="safetensors") as err:
            load(model_dir)
        assert_named(err, weights)

    reward = tmp_path / "reward"
    shutil.copytree(EMBEDDED_REWARD, reward)
    random_bytes(reward / "model.safetensors") if damage == "random" else truncate(
        reward / "model.safetensors"
    )
    with pytest.raises(ValueError) as err:
        LearnedReward.from_pretrained(reward)
    assert_named(err, reward / "model.safetensors")


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ("[1, 2, 3]", "not an object"),
        ('{"model_type": "mdlm", "vocab_size": 300}', "lacks"),
        (json.dumps({**TINY, "hidden_dim": "wide"}), "not a valid MDLM config"),
        (json.dumps({**TINY, "model_type": "bd3lm"}), "model_type"),
    ],
)
def test_a_bad_config_json_is_named(model_dir, content, says):
    config = model_dir / "config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (MDLMDenoiser.from_pretrained, load_denoiser):
        with pytest.raises(ValueError, match=says) as err:
            load(model_dir)
        assert_named(err, config)


@pytest.mark.parametrize(
    "content, says",
    [("{oops", "not valid JSON"), ('{"model_type": "lightning_smc_learned_reward"}', "lacks")],
)
def test_a_bad_reward_config_json_is_named(tmp_path, content, says):
    reward = tmp_path / "reward"
    shutil.copytree(EMBEDDED_REWARD, reward)
    (reward / "config.json").write_text(content)
    with pytest.raises(ValueError, match=says) as err:
        LearnedReward.from_pretrained(reward)
    assert_named(err, reward / "config.json")


@pytest.mark.parametrize(
    "name, damage",
    [
        ("adapter_model.safetensors", "random"),
        ("adapter_model.safetensors", "truncated"),
        ("adapter_config.json", "{not json"),
        ("adapter_config.json", "[]"),
        ("lsmc_adapter.json", "{not json"),
        ("lsmc_adapter.json", '{"vocab_size": 300}'),
    ],
)
def test_a_corrupted_adapter_file_is_named(tmp_path, name, damage):
    base, adapter = adapter_dir(tmp_path)
    path = adapter / name
    if damage == "random":
        random_bytes(path, 300)
    elif damage == "truncated":
        truncate(path)
    else:
        path.write_text(damage)
    with pytest.raises(ValueError) as err:
        LoRADenoiser.from_adapter(base, adapter)
    assert_named(err, path)


def test_an_adapter_config_peft_cannot_use_names_the_adapter(tmp_path):
    base, adapter = adapter_dir(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    with pytest.raises(ValueError) as err:
        LoRADenoiser.from_adapter(base, adapter)
    assert_named(err, adapter)


def test_the_embedded_files_still_load():
    denoiser, spec = load_model("embedded")
    assert spec.vocab_size == denoiser.vocab_size
    assert LoRADenoiser.from_adapter(denoiser, EMBEDDED_ADAPTER).vocab_size == spec.vocab_size
    assert LearnedReward.from_pretrained("embedded").vocab_size == spec.vocab_size


def test_the_embedded_paths_are_defined_once():
    from lightning_smc.rewards import EMBEDDED_MODEL, EMBEDDED_SENTIMENT_REWARD

    assert EMBEDDED_MODEL is EMBEDDED and EMBEDDED_SENTIMENT_REWARD is EMBEDDED_REWARD
    sources = [p for p in (ROOT / "lightning_smc").rglob("*.py") if p.name != "loading.py"]
    for path in sources:
        text = path.read_text()
        for folder in ("mdlm_tiny", "sentiment_reward_tiny", "sentiment_adapter_tiny"):
            assert f'"{folder}"' not in text, f"{path} defines the asset path {folder} again"


# ---- 3. fit: no optimizer step exports nothing; a sampling config gets the hint ----------------
def test_fit_with_no_optimizer_step_exports_nothing(tmp_path, tokenizer_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = fit_config(tmp_path, tokenizer_dir)
    with pytest.raises(SystemExit) as exit_:
        fit_main(["fit", "--config", str(config), "--trainer.max_steps", "0"])
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    assert "no optimizer step" in stderr and "--trainer.max_steps" in stderr
    assert not (tmp_path / "run" / "hf").exists()


def test_fit_resumes_with_ema_state_and_refuses_code(tmp_path, tokenizer_dir, monkeypatch):
    """The safe checkpoint I/O reads fit's own checkpoints (EMA state included)."""
    monkeypatch.chdir(tmp_path)
    config = fit_config(tmp_path, tokenizer_dir)
    fit_main(["fit", "--config", str(config)])
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert "current_model_state" in read_checkpoint(last)  # EMAWeightAveraging's raw weights
    cli = fit_main(["fit", "--config", str(config), "--trainer.max_steps", "3",
                    "--ckpt_path", str(last)])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    marker = tmp_path / "PWNED"
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError) as err:
        fit_main(["fit", "--config", str(config), "--ckpt_path", str(evil)])
    assert_named(err, evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "config", ["configs/methods/embedded/smc_base.yaml", "configs/eval/srsmc_genppl.yaml"]
)
def test_a_sampling_config_given_to_fit_gets_the_sample_command(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit_main(["fit", "--config", str(ROOT / config)])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "sampling config" in stderr
    assert f"python -m lightning_smc.sample --config {ROOT / config}" in stderr
