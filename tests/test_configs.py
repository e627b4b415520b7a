"""Every config under configs/ parses and smoke-runs (fast_dev_run) through the real CLI."""

import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_smc.export import export
from lightning_smc.fit import main
from lightning_smc.models import MDLMDenoiser
from lightning_smc.sample import load_model

ROOT = Path(__file__).resolve().parents[1]
# Method and comparison configs (configs/methods/, configs/eval/) are sampling configs,
# smoke-run by tests/test_methods.py.
CONFIGS = sorted(
    c for c in (ROOT / "configs").rglob("*.yaml") if not {"methods", "eval"} & set(c.parts)
)
# Real configs shrunk to CPU size (the at-scale ones point at hub data and GPUs).
SMOKE = [
    "--trainer.fast_dev_run",
    "1",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.strategy",
    "auto",
    "--trainer.precision",
    "32-true",
    "--trainer.num_nodes",
    "1",
    "--data.init_args.corpus",
    "shakespeare",
    "--data.init_args.tokenizer",
    "null",
    "--data.init_args.num_workers",
    "0",
    "--data.init_args.max_documents",
    "4",
    "--data.init_args.vocab_size",
    "300",
    "--data.init_args.batch_size",
    "2",
    "--data.init_args.seq_len",
    "32",
]
# Image configs (Fashion-MNIST): a few images; a random VQ stands in for a trained one.
IMAGE_SMOKE = [
    *SMOKE[:12],
    "--data.init_args.max_train",
    "8",
    "--data.init_args.val_size",
    "8",
    "--data.init_args.batch_size",
    "4",
]
ARITH_SMOKE = ["--data.init_args.batch_size", "2", "--data.init_args.num_train", "8"]
RANDOM_VQ = ["--model.init_args.vq", '{"class_path": "lightning_smc.models.vq.VQTokenizer"}']
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# Reward configs keep their base model's tokenizer (its vocabulary is the reward's): no BPE.
REWARD_SMOKE = [
    x
    for flag, value in zip(SMOKE[::2], SMOKE[1::2], strict=True)
    if flag not in {"--data.init_args.tokenizer", "--data.init_args.vocab_size"}
    for x in (flag, value)
]


_VADER = {
    "class_path": "lightning_smc.rewards.VaderSentiment",
    "init_args": {"tokenizer": "embedded"},
}
AMORTIZED_SHRINK = [
    "--model.init_args.base",
    "embedded",
    "--model.init_args.seq_len",
    "8",
    "--model.init_args.num_steps",
    "4",
    "--model.init_args.rollouts",
    "2",
    "--model.init_args.transitions",
    "2",
]

# Amortized configs on the embedded image model: the seeded random tiny one, 2 steps, 2 rollouts.
IMAGE_SHRINK = ["base", "random_tiny_image", "num_steps", "2", "rollouts", "2"]


def offline_copy(config: Path, tmp_path: Path) -> Path:
    """The at-scale amortized config with its hub model and classifiers swapped for embedded
    ones (everything else, e.g. the trainer, LoRA and evaluation settings, is kept)."""
    data = yaml.safe_load(config.read_text())
    model = data["model"]["init_args"]
    model["base"], model["reward"], model["target_modules"] = "embedded", _VADER, None
    for callback in data["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("RewardEvaluation"):
            callback["init_args"]["holdout"] = None
    copy = tmp_path / config.name
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML file"


@pytest.mark.parametrize(
    "config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS]
)
def test_config_smoke_runs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    shrink = [
        "--model.init_args.denoiser.init_args.vocab_size",
        "300",
        "--model.init_args.denoiser.init_args.model_length",
        "32",
    ]
    smoke = SMOKE
    if "TextImageFinetuning" in config.read_text():  # at scale: no hub pipeline here
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        offline = ["--model.init_args.local_files_only", "true"]
        with pytest.raises(ValueError, match="huggingface-cli download"):
            main(["fit", "--config", str(config), *SMOKE[:12], *offline])
        return  # fine-tuned at tiny size by tests/test_text_image_finetune.py
    init = yaml.safe_load(config.read_text()).get("model", {}).get("init_args", {})
    if config.parent.name == "amortized" and "prompts" in init:  # a text-to-image base
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # at scale: the pipeline is absent here
        jpeg = '{"class_path": "lightning_smc.rewards.JpegCompressibility", "init_args": {"vq": "embedded"}}'  # fmt: skip
        with pytest.raises((ValueError, FileNotFoundError), match="huggingface-cli download"):
            main(["fit", "--config", str(config), *SMOKE[:12], "--model.init_args.reward", jpeg])
        return  # its settings run on a tiny pipeline in tests/test_image_amortized.py
    if config.parent.name == "reward":  # a learned reward on a base model's tokenizer: no denoiser
        smoke, shrink = REWARD_SMOKE, []
    if "FashionMNISTDataModule" in config.read_text():
        if not FMNIST.is_file():
            pytest.skip("Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
        smoke, shrink = IMAGE_SMOKE, RANDOM_VQ if "ImagePretraining" in config.read_text() else []
    if "ArithmeticDataModule" in config.read_text():  # a synthetic task with its own tokenizer
        smoke, shrink = [*SMOKE[:12], *ARITH_SMOKE], []
    if config.name == "quickstart.yaml" or config.parent.name == "amortized":
        smoke, shrink = SMOKE[:12], AMORTIZED_SHRINK  # rollouts of the sampler: no data module
        if "kuleshov-group" in config.read_text():  # at scale: hub model and classifiers
            config = offline_copy(config, tmp_path)
        if "init_adapter:" in config.read_text():  # its F_psi has one value per step: keep them
            steps = str(yaml.safe_load(config.read_text())["model"]["init_args"]["num_steps"])
            shrink = [steps if flag == "4" else flag for flag in shrink]
            start = yaml.safe_load(config.read_text())["model"]["init_args"]["init_adapter"]
            if str(start).startswith("outputs/"):  # a stage's output: start from the packaged one
                shrink = [*shrink, "--model.init_args.init_adapter", "embedded"]
    if config.parent.name == "amortized" and init.get("base") == "embedded_image":
        shrink = [f"--model.init_args.{k}" if i % 2 == 0 else k for i, k in enumerate(IMAGE_SHRINK)]
    cli = main(["fit", "--config", str(config), *smoke, *shrink])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    for callback in cli.trainer.callbacks:  # evaluation callbacks ran (smoke-sized) at validation
        if type(callback).__name__ == "RewardEvaluation":
            (results,) = callback.history
            assert set(results) == {"step"} | {m.name for m in callback.methods}


def test_offline_wandb_run_records_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = SMOKE[2:]  # everything but fast_dev_run, which disables loggers
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/pretrain/mdlm_tiny.yaml"),
            *args,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--model.init_args.denoiser.init_args.vocab_size",
            "300",
        ]
    )
    run_dir = Path(cli.trainer.logger.experiment.dir).resolve().parent
    cli.trainer.logger.experiment.finish()  # flush this offline run to disk
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    # wandb-core (a separate process) may still be writing the file when finish() returns on
    # a busy machine: wait for it, up to a bound
    deadline, history = time.monotonic() + 60, b""
    while time.monotonic() < deadline:
        history = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
        if b"train/loss" in history and b"val/nll" in history:
            break
        time.sleep(0.5)
    assert b"train/loss" in history and b"val/nll" in history
    assert (tmp_path / "outputs/mdlm_tiny/hf/model.safetensors").exists()
    run = tmp_path / "outputs/mdlm_tiny"
    assert (run / "config.yaml").exists() and not (tmp_path / "config.yaml").exists()
    # Exporting last.ckpt gives the same model and tokenizer as fit's own export.
    export(run / "config.yaml", run / "checkpoints/last.ckpt", tmp_path / "exported")
    a, b = (
        MDLMDenoiser.from_pretrained(run / "hf"),
        MDLMDenoiser.from_pretrained(tmp_path / "exported"),
    )
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert load_model(tmp_path / "exported")[1].vocab_size == a.vocab_size


def test_unknown_config_key_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS[0]), "--model.init_args.no_such_key", "1"])
    assert "no_such_key" in capsys.readouterr().err


def test_progress_bar_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs/quickstart.yaml"
    steps = str(yaml.safe_load(config.read_text())["model"]["init_args"]["num_steps"])
    shrink = [steps if flag == "4" else flag for flag in AMORTIZED_SHRINK]  # F_psi of the adapter
    off = [*SMOKE[:12], *shrink, "--trainer.enable_progress_bar", "false"]
    cli = main(["fit", "--config", str(config), *off, "--trainer.callbacks", "[]"])
    assert cli.trainer.state.finished and cli.trainer.progress_bar_callback is None
    on = main(["fit", "--config", str(config), *off[:-2], "--trainer.callbacks", "[]"])
    assert type(on.trainer.progress_bar_callback).__name__ == "RichProgressBar"


# ------------------------------------------------------------------ diffusion LLM method configs
# configs/methods/dllm/ (LLaDA / Dream at scale, bf16 on a GPU): each runs through the sample CLI
# on a tiny random folder of its backbone, shrunk to 2 GSM8K problems of 16 tokens on the CPU.
DLLM_CONFIGS = sorted((ROOT / "configs" / "methods" / "dllm").glob("*.yaml"))
DLLM_SMOKE = ["--device", "cpu", "--limit", "2", "--gen_length", "16", "--batch_size", "2",
              "--method.block_length", "8", "--method.num_steps", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dllms(tmp_path_factory):
    from test_reasoning_sample import tiny_dllm_folder

    root = tmp_path_factory.mktemp("dllm")
    return {kind: tiny_dllm_folder(root / kind, kind) for kind in ("llada", "dream")}


def test_dllm_configs_exist():
    stems = {c.stem for c in DLLM_CONFIGS}
    for model in ("llada_instruct", "llada_1.5", "dream_instruct"):
        assert {f"{model}_plain", f"{model}_srsmc"} <= stems, model


@pytest.mark.parametrize("config", DLLM_CONFIGS, ids=[c.stem for c in DLLM_CONFIGS])
def test_dllm_config_smoke_runs(config, tiny_dllms, tmp_path):
    import json

    from lightning_smc.sample import main as sample

    data = yaml.safe_load(config.read_text())
    method = data["method"]
    assert data["gen_length"] == 256 and data["dtype"] == "bfloat16" and data["device"] == "cuda"
    assert method["block_length"] == 32 and method["unmasking"] == "threshold"
    assert method["confidence_threshold"] == 0.9 and method["kv_cache"] == "prefix"
    if method["name"] == "SR-SMC":
        assert method["num_particles"] == 4 and method["resample_when"] == "block:0.5"
        assert method["select"] == "confidence" and method["potential"]["init_args"]["beta"] == 1
    kind = "dream" if config.stem.startswith("dream") else "llada"
    out = tmp_path / "out"
    summaries = sample(["--config", str(config), "--model", str(tiny_dllms[kind]), *DLLM_SMOKE,
                        "--out", str(out)])  # fmt: skip
    (summary,) = summaries.values()
    assert summary["task"] == "gsm8k" and summary["num_items"] == 2
    assert summary["particles"] == method["num_particles"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "summary.json").read_text()).keys() == summaries.keys()
