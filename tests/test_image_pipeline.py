"""The image pipeline at toy size: ``ImagePretraining`` (masking, label dropout, EMA, exact
resume, export), sampling images through the shared sampler (``sample`` CLI: PNG + npz), CFG as a
product target on the image model (weights = the formula), and the ``ImageEvaluation`` callback.

Synthetic 28 x 28 images and a tiny random VQ (7 x 7 grids of 32 codes) keep every test on CPU
in seconds; no data set or trained asset is needed."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from PIL import Image

from lightning_smc.callbacks import ImageEvaluation
from lightning_smc.data.images import ImageDataset
from lightning_smc.data.packing import EpochShuffleSampler, ResumableDataLoader
from lightning_smc.diffusion import get_schedule
from lightning_smc.evaluation.images import sample_images
from lightning_smc.methods import Method, ProductTargetSpec, build_sampler, load_method_config
from lightning_smc.models.image import ImageModel, load_image_model
from lightning_smc.models.meissonic import MeissonicClassTransformer, MeissonicDenoiser
from lightning_smc.models.vq import TINY_FMNIST_CONFIG, VQTokenizer
from lightning_smc.modules import ImagePretraining
from lightning_smc.modules.image_pretrain import mask_grids
from lightning_smc.sample import main as sample_main

ROOT = Path(__file__).resolve().parents[1]
# (reward-steering configs, with a reward: smoke-run by tests/test_image_amortized.py)
IMAGE_CONFIGS = sorted(
    c
    for c in (ROOT / "configs" / "methods" / "images").glob("*.yaml")
    if "reward:" not in c.read_text()
)
CODES, CLASSES = 32, 4
QUIET = dict(
    accelerator="cpu",
    val_check_interval=1,
    check_val_every_n_epoch=None,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def tiny_vq(seed: int = 0) -> VQTokenizer:
    config = {
        **TINY_FMNIST_CONFIG,
        "block_out_channels": [8, 16, 16],
        "latent_channels": 4,
        "num_vq_embeddings": CODES,
        "norm_num_groups": 4,
    }
    torch.manual_seed(seed)
    return VQTokenizer(config, image_size=28)


def tiny_transformer(seed: int = 0) -> MeissonicClassTransformer:
    torch.manual_seed(seed)
    return MeissonicClassTransformer(
        num_classes=CLASSES,
        num_class_tokens=2,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
        vocab_size=CODES + 1,
        codebook_size=CODES,
    )


def tiny_module(seed: int = 0, **kwargs) -> ImagePretraining:
    args = dict(lr=3e-3, warmup_steps=1, class_dropout=0.25, seed=0, num_grid_images=3)
    return ImagePretraining(tiny_transformer(seed), tiny_vq(), **{**args, **kwargs})


class ToyImages(L.LightningDataModule):
    """Random grey images with labels; a resumable, seeded train loader (as Fashion-MNIST's)."""

    num_classes = CLASSES

    def __init__(self, n: int = 48, batch_size: int = 8):
        super().__init__()
        rng = np.random.default_rng(0)
        self.data = ImageDataset(
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, CLASSES, n)
        )
        self.batch_size = batch_size

    def train_dataloader(self):
        sampler = EpochShuffleSampler(self.data, seed=0)
        return ResumableDataLoader(
            self.data, batch_size=self.batch_size, sampler=sampler, drop_last=True
        )

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size)

    def split(self, name: str) -> ImageDataset:  # the reference images of FID / IS
        return self.data


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.denoiser.state_dict().items()}


def ema_state(ema: EMAWeightAveraging) -> dict[str, torch.Tensor]:
    prefix = "module.denoiser."
    average = ema._average_model.state_dict()
    return {k[len(prefix) :]: v.clone() for k, v in average.items() if k.startswith(prefix)}


# ---- 1. pretraining ----------------------------------------------------------------------------
def test_masks_follow_the_cosine_schedule():
    x0 = torch.randint(0, CODES, (512, 49))
    g = torch.Generator().manual_seed(0)
    x_t, masked, t = mask_grids(x0, CODES, get_schedule("maskgit_cosine"), g)
    expected = (torch.sin(math.pi * t.double() / 2) * 49).round().clamp(1, 49)
    assert torch.equal(masked.sum(-1), expected.long())  # n = round(L sin(pi t / 2)), >= 1
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], CODES))
    assert torch.equal(x_t[~masked], x0[~masked])
    # the masked share's law is MaskGIT's cos(pi u / 2), u ~ U(0, 1): mean 2 / pi
    share = masked.float().mean(-1)
    assert abs(float(share.mean()) - 2 / math.pi) < 4 * float(share.std()) / math.sqrt(512)


def test_class_dropout_rate():
    module = tiny_module()
    labels = torch.randint(0, CLASSES, (20000,))
    dropped = module.drop_labels(labels, torch.Generator().manual_seed(1))
    null = dropped == CLASSES
    p = 0.25
    assert abs(float(null.float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / len(labels))
    assert torch.equal(dropped[~null], labels[~null])
    module.hparams.class_dropout = 0.0
    assert torch.equal(module.drop_labels(labels, torch.Generator().manual_seed(1)), labels)


def fit(steps: int, root: Path, resume: str | None = None, init: int = 0, ckpt: bool = False):
    ema = EMAWeightAveraging(decay=0.9)
    callbacks = [ema]
    if ckpt:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
        )
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        enable_checkpointing=ckpt,
        default_root_dir=root,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        **QUIET,
    )
    module = tiny_module(seed=init)
    initial = state(module)
    trainer.fit(module, datamodule=ToyImages(), ckpt_path=resume)
    assert trainer.global_step == steps
    return module, ema, initial


def test_pretraining_learns_resumes_exactly_and_exports(tmp_path):
    fit(2, tmp_path / "a", ckpt=True)  # interrupted after 2 steps, mid-epoch
    last = tmp_path / "a" / "ckpt" / "last.ckpt"
    resumed, ema_r, _ = fit(4, tmp_path / "b", resume=str(last), init=1)  # init is overridden
    straight, ema, initial = fit(4, tmp_path / "c")
    for k, v in state(straight).items():
        assert torch.equal(v, state(resumed)[k]), k
    averaged = ema_state(ema)
    assert averaged.keys() == initial.keys()
    for k, v in averaged.items():
        assert torch.equal(v, ema_state(ema_r)[k]), k
    # EMA: the average moved away from the initial weights and is not the raw weights; at the
    # end of fit it is copied into the model (what is exported)
    assert any(not torch.equal(averaged[k], initial[k]) for k in initial)
    assert all(torch.equal(averaged[k], v) for k, v in state(straight).items())
    model = load_image_model(tmp_path / "c" / "image_model")
    assert model.grid_shape == (7, 7) and model.num_classes == CLASSES
    for k, v in model.denoiser.state_dict().items():
        assert torch.equal(v, state(straight)[k]), k


def test_validation_logs_loss_and_a_fill_in_grid(tmp_path):
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(tiny_module(), datamodule=ToyImages())
    assert {"val/loss", "val/masked_accuracy"} <= set(trainer.callback_metrics)
    (png,) = (tmp_path / "images").glob("fill_in_step*.png")
    assert Image.open(png).size == (3 * 30 + 2, 3 * 30 + 2)  # 3 rows x 3 images of 28 + pad


def test_token_batches_train_without_a_vq_and_skip_images(tmp_path, caplog):
    module = ImagePretraining(tiny_transformer(), vq=None, grid_shape=(7, 7), warmup_steps=1)
    tokens = torch.randint(0, CODES, (16, 7, 7))
    data = torch.utils.data.TensorDataset(tokens, torch.randint(0, CLASSES, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, loader, loader)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert not (tmp_path / "images").exists()
    with pytest.raises(ValueError, match="no vq"):
        module.tokens_and_labels((torch.rand(2, 1, 28, 28), torch.zeros(2)))
    with pytest.raises(FileNotFoundError, match="vq_fmnist_tiny.yaml"):
        ImagePretraining(tiny_transformer(), vq=str(tmp_path / "no_vq"))


# ---- 2. sampling -------------------------------------------------------------------------------
def tiny_image_model() -> ImageModel:
    return ImageModel(MeissonicDenoiser(tiny_transformer(), (7, 7)).eval(), tiny_vq().eval())


@pytest.mark.parametrize("config", IMAGE_CONFIGS, ids=[c.name for c in IMAGE_CONFIGS])
def test_image_method_configs_parse_and_sample_png_and_npz(config, tmp_path):
    assert load_method_config(config).model == "embedded_image"
    out = tmp_path / "out"
    args = ["--config", str(config), "--out", str(out), "--num_samples", "3"]
    args += ["--model", "random_tiny_image", "--method.num_steps", "4"]
    summaries = sample_main(args)
    (name,) = summaries
    assert summaries[name]["ess"] == pytest.approx(1.0)
    files = np.load(out / "samples.npz")
    tokens, images = files["tokens"], files["images"]
    assert tokens.shape == (3, 49) and images.shape == (3, 1, 28, 28) and images.dtype == np.uint8
    assert tokens.min() >= 0 and tokens.max() < 256  # codebook ids only: no mask, no padding
    assert files["labels"].tolist() == [0, 1, 2] and files["log_weights"].shape == (3, 1)
    (png,) = out.glob("grid_*.png")
    assert Image.open(png).mode == "L"


def test_prompt_is_a_class_and_seq_len_must_be_the_grid(tmp_path):
    config = str(IMAGE_CONFIGS[0])
    base = ["--config", config, "--out", str(tmp_path), "--model", "random_tiny_image"]
    sample_main([*base, "--num_samples", "2", "--method.num_steps", "2", "--prompt", "3"])
    assert np.load(tmp_path / "samples.npz")["labels"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="seq_len: 49"):
        sample_main([*base, "--seq_len", "32"])
    with pytest.raises(ValueError, match="not a class"):
        sample_main([*base, "--prompt", "99"])


def test_cfg_product_weights_are_the_mixture_normalizers():
    """One step from the all-masked grid commits every position, so log Z is exactly
    sum_i log sum_v p(v | y)^w p(v | null)^(1 - w)."""
    model, w = tiny_image_model(), 2.5
    with torch.no_grad():  # labels that matter: p(. | y) far from p(. | null)
        model.transformer.class_embedding.weight.mul_(30)
        model.transformer.class_context.weight.mul_(30)
        for param in model.transformer.mlm_layer.parameters():
            param.mul_(4)
    method = Method(num_steps=1, potential=ProductTargetSpec(weight=w, second_cond=CLASSES))
    sampler = build_sampler(method, model.denoiser)
    labels = torch.tensor([0, 3])
    out = sampler.sample(49, batch_size=2, cond=labels, generator=torch.Generator().manual_seed(0))
    x_t = torch.full((2, 49), model.denoiser.mask_id)
    t = torch.ones(2)
    with torch.no_grad():
        lp_c = torch.log_softmax(model.denoiser(x_t, t, labels).double(), -1)
        lp_u = torch.log_softmax(model.denoiser(x_t, t, torch.full((2,), CLASSES)).double(), -1)
    mixed = torch.where(torch.isfinite(lp_c), w * lp_c + (1 - w) * lp_u, -torch.inf)
    expected = torch.logsumexp(mixed, -1).sum(-1)
    assert (expected.abs() > 0.1).all()  # not degenerate
    # the sampler normalizes in float32 (49 positions): agreement to float32 rounding
    torch.testing.assert_close(out.log_normalizer, expected, rtol=0, atol=1e-4)
    assert (out.tokens < CODES).all()
    assert out.nfe == 2  # the conditional and the null-class evaluation
    # second_cond=None is the denoiser's own null input (cond=None -> the null class)
    same = build_sampler(
        Method(num_steps=1, potential=ProductTargetSpec(weight=w)), model.denoiser
    ).sample(49, batch_size=2, cond=labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.log_normalizer, expected, rtol=0, atol=1e-4)


def test_sample_images_does_not_depend_on_the_batch_size():
    model = tiny_image_model()
    method = Method(num_steps=4, schedule="maskgit_cosine")
    one = sample_images(method, model, [0, 1, 2], batch_size=3)
    two = sample_images(method, model, [0, 1, 2], batch_size=1)
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.images, two.images)


# ---- 3. the evaluation callback ----------------------------------------------------------------
def test_image_evaluation_logs_its_keys_grids_and_a_resample_strip(tmp_path):
    smc = Method(
        name="CFG-SMC",
        num_particles=3,
        num_steps=4,
        schedule="maskgit_cosine",
        resample_when="always",
        potential=ProductTargetSpec(weight=2.0, second_cond=CLASSES),
    )
    plain = Method(name="plain", num_steps=4, schedule="maskgit_cosine")
    callback = ImageEvaluation(
        [plain, smc],
        labels=[0, 1, 2, 3, 0, 1],
        classifier="fmnist_classifier_tiny",  # the committed domain classifier
        fidelity=["fid", "isc"],
        reference_size=16,
    )
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[callback],
        **QUIET,
    )
    trainer.fit(tiny_module(), datamodule=ToyImages())
    for name in ("plain", "CFG-SMC"):
        for key in ("ess", "resamples", "nfe", "seconds", "accuracy", "fid", "isc"):
            assert f"eval/{name}/{key}" in trainer.callback_metrics, (name, key)
        assert (tmp_path / "image_eval" / "step0000001" / f"grid_{name}.png").is_file()
    assert float(trainer.callback_metrics["eval/CFG-SMC/resamples"]) == 3  # after steps 1..3
    assert (
        float(trainer.callback_metrics["eval/CFG-SMC/nfe"]) == 2 * 4
    )  # per particle: the conditional and the null-class call per step
    strip = callback.last_samples["CFG-SMC"].strip
    assert strip.step == 0 and strip.before.shape == strip.after.shape == (3, 1, 28, 28)
    assert 0 <= float(trainer.callback_metrics["eval/plain/accuracy"]) <= 1
    assert (
        1 <= float(trainer.callback_metrics["eval/plain/isc"]) <= 10
    )  # the classifier has 10 classes
    assert (tmp_path / "image_eval" / "step0000001" / "strip_CFG-SMC.png").is_file()
    assert callback.history[0]["step"] == 1
