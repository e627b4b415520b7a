"""``VQTokenizer`` (diffusers ``VQModel``) and ``VQPretraining``: shapes, ids, Hub-format loading,
exact resume from ``last.ckpt``, and the fit config through the real CLI.

Tiny random models (8-16 channels) keep everything on CPU in a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import VQModel
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_smc.data.images import DEFAULT_ROOT, FashionMNISTDataModule
from lightning_smc.fit import main
from lightning_smc.models.vq import TINY_FMNIST_CONFIG, VQTokenizer
from lightning_smc.modules.vq_pretraining import VQPretraining

ROOT = Path(__file__).resolve().parents[1]
HAVE_DATA = (Path(DEFAULT_ROOT) / "train-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA,
    reason=f"Fashion-MNIST absent from {DEFAULT_ROOT}: apt-get install dataset-fashion-mnist",
)
SMALL = {
    **TINY_FMNIST_CONFIG,
    "block_out_channels": [8, 16, 16],
    "latent_channels": 4,
    "num_vq_embeddings": 32,
    "norm_num_groups": 4,
}
# the fields of aMUSEd's / Meissonic's vqvae/config.json, at toy size (2 down blocks: f = 2)
AMUSED_STYLE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "num_vq_embeddings": 64,
    "norm_num_groups": 4,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": False,
    "lookup_from_codebook": True,
    "force_upcast": False,
    "sample_size": 32,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_tokenizer(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(SMALL, image_size=28)


def test_round_trip_shapes_and_ids():
    tok = small_tokenizer()
    assert tok.grid_shape == (7, 7) and tok.num_tokens == 49 and tok.codebook_size == 32
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    tokens = tok.encode(images)
    assert tokens.shape == (5, 7, 7) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.codebook_size
    with torch.no_grad():
        decoded = tok.decode(tokens)
    assert decoded.shape == (5, 1, 28, 28)
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    assert torch.equal(tok.decode(tokens.flatten(1)), decoded)  # flattened grid, same images
    out = tok(images)  # the training path: same ids, unclamped reconstruction, scalar loss
    assert torch.equal(out.tokens, tokens) and out.quantizer_loss.dim() == 0
    # z + (z_q - z).detach(): the straight-through latents equal the codes up to rounding
    assert torch.allclose(out.reconstruction.clamp(0, 1), decoded, atol=1e-5)
    one_hot = torch.nn.functional.one_hot(tokens.flatten(1), tok.codebook_size).float()
    assert torch.allclose(tok.decode_probs(one_hot), decoded, atol=1e-6)


def test_bad_tokens_and_images_are_named():
    tok = small_tokenizer()
    with pytest.raises(ValueError, match="codebook holds 0..31"):
        tok.decode(torch.full((1, 49), 32))  # e.g. a mask id
    with pytest.raises(ValueError, match=r"\[B, 7, 7\] or the flattened \[B, 49\]"):
        tok.decode(torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        tok.encode(torch.rand(1, 3, 28, 28))


def test_from_pretrained_reads_an_amused_style_vqvae_folder(tmp_path):
    torch.manual_seed(0)
    reference = VQModel(**AMUSED_STYLE).eval()
    reference.save_pretrained(tmp_path / "vqvae")
    config = json.loads((tmp_path / "vqvae" / "config.json").read_text())
    assert config["lookup_from_codebook"] is True and config["_class_name"] == "VQModel"
    tok = VQTokenizer.from_pretrained(tmp_path, subfolder="vqvae", image_size=16)
    assert tok.grid_shape == (8, 8) and tok.codebook_size == 64
    same = VQTokenizer.from_pretrained(tmp_path / "vqvae", image_size=16)
    for (k, a), (_, b) in zip(tok.state_dict().items(), same.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = tok.encode(images)
    with torch.no_grad():  # aMUSEd's own path: quantize the latents; decode ids from the codebook
        ids = reference.quantize(reference.encode(images).latents)[2][2].reshape(2, 8, 8)
        decoded = reference.decode(ids, force_not_quantize=True, shape=(2, 8, 8, 4)).sample
    assert torch.equal(tokens, ids)
    assert torch.allclose(tok.decode(tokens, clamp=False), decoded, atol=1e-6)


def test_save_pretrained_round_trip_keeps_the_image_size(tmp_path):
    tok = small_tokenizer()
    tok.save_pretrained(tmp_path / "vq")
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert loaded.image_size == 28 and loaded.grid_shape == (7, 7)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    with pytest.raises(FileNotFoundError, match="vqvae"):
        VQTokenizer.from_pretrained(tmp_path)  # a folder without config.json


# ---- training --------------------------------------------------------------------------------
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
)


def fit(dm, steps: int, root: Path, ckpt_dir=None, resume: str | None = None, init: int = 0):
    # dead_below 0.95 with decay 0.95: a code unused for two steps (average 0.9025) is restarted
    module = VQPretraining(
        small_tokenizer(init), lr=3e-3, warmup_steps=1, restart_every=2, dead_below=0.95, seed=0
    )
    every = {"every_n_train_steps": steps, "save_last": True}  # saved mid-epoch
    callbacks = [] if ckpt_dir is None else [ModelCheckpoint(dirpath=ckpt_dir, **every)]
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
        default_root_dir=root,  # the tokenizer is exported to <root>/vq at the end of fit
        **QUIET,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    assert trainer.global_step == steps
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return state, trainer.callback_metrics


@needs_data
def test_training_resumes_exactly_from_last_ckpt(tmp_path):
    dm = FashionMNISTDataModule(batch_size=8, max_train=64, seed=0)
    fit(
        dm, steps=2, root=tmp_path, ckpt_dir=tmp_path / "ckpt"
    )  # interrupted after two steps (mid-epoch)
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed, _ = fit(dm, steps=4, root=tmp_path, resume=str(last), init=1)  # init overridden
    straight, logged = fit(dm, steps=4, root=tmp_path)
    assert VQTokenizer.from_pretrained(tmp_path / "vq").grid_shape == (7, 7)  # the export
    assert float(logged["train/restarted_codes"]) > 0  # the seeded restart ran at step 2
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


@needs_data
def test_fit_config_runs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    smoke = ["--trainer.fast_dev_run", "1", "--trainer.logger", "false"]
    shrink = [
        "--model.init_args.tokenizer.init_args.config",
        json.dumps(SMALL),
        "--data.init_args.max_train",
        "64",
        "--data.init_args.batch_size",
        "4",
    ]
    config = ROOT / "configs/pretrain/vq_fmnist_tiny.yaml"
    cli = main(["fit", "--config", str(config), *smoke, *shrink])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert {"val/recon_mse", "val/code_usage", "val/code_perplexity"} <= set(metrics)
    assert 0 < float(metrics["val/code_usage"]) <= 1


@needs_data
def test_committed_tokenizer_reconstructs_test_images():
    tok = VQTokenizer.from_pretrained(ROOT / "lightning_smc/assets/vq_fmnist_tiny").eval()
    assert tok.grid_shape == (7, 7) and tok.codebook_size == 256 and tok.channels == 1
    images = FashionMNISTDataModule().split("test").uint8_images()[:64].float() / 255
    tokens = tok.encode(images)
    with torch.no_grad():
        mse = float((tok.decode(tokens) - images).pow(2).mean())
    assert mse < 0.012  # the card: 0.0072 on the 10,000 test images
    assert tokens.unique().numel() > 64  # many codes in use, not a collapsed codebook
