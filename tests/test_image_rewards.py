"""Image rewards (``lightning_smc.rewards.image`` and ``image_adapters``) on a tiny random VQ
(7 x 7 grids of 32 codes) and the packaged Fashion-MNIST classifiers: shapes, the soft one-hot
path (equal to ids on exact one-hots; gradients equal finite differences), the holdout, JPEG
sign conventions, the adapters' error paths and pure-torch parts, and SMCgrad on a tiny image
denoiser through the shared sampler."""

from __future__ import annotations

import math
import re
import sys
import types

import pytest
import torch

from lightning_smc.methods import GradientProposalSpec, Method, RewardTiltSpec, build_sampler
from lightning_smc.models.image import ImageModel
from lightning_smc.models.meissonic import MeissonicClassTransformer, MeissonicDenoiser
from lightning_smc.models.vq import TINY_FMNIST_CONFIG, VQTokenizer
from lightning_smc.proposals import GradientProposal
from lightning_smc.rewards.image import (
    ClassReward,
    HoldoutClassReward,
    JpegCompressibility,
    JpegIncompressibility,
    jpeg_sizes_kb,
    resolve_vq,
)
from lightning_smc.rewards.image_adapters import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    HPSv2Score,
    ImageRewardScore,
    LaionAesthetic,
    clip_preprocess,
)

CODES, CLASSES, L = 32, 4, 49
V = CODES + 1  # the denoiser's vocabulary: the codes and the mask id


def tiny_vq(seed: int = 0) -> VQTokenizer:
    config = {
        **TINY_FMNIST_CONFIG,
        "block_out_channels": [8, 16, 16],
        "latent_channels": 4,
        "num_vq_embeddings": CODES,
        "norm_num_groups": 4,
    }
    torch.manual_seed(seed)
    return VQTokenizer(config, image_size=28).eval()


@pytest.fixture(scope="module")
def vq() -> VQTokenizer:
    return tiny_vq()


@pytest.fixture(scope="module")
def reward(vq) -> ClassReward:
    return ClassReward(target=7, vq=vq)


def ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CODES, (batch, L), generator=torch.Generator().manual_seed(seed))


# ---- class rewards ------------------------------------------------------------------------------
def test_rewards_map_ids_to_float64_scores(vq, reward):
    x = ids(3)
    for r in (reward, HoldoutClassReward(7, vq=vq), JpegCompressibility(vq)):
        value = r(x)
        assert value.shape == (3,) and value.dtype == torch.float64
        assert torch.isfinite(value).all()
    assert (reward(x) <= 0).all()  # a log-probability
    # batch_size chunks give the same scores; rows are scored alone
    chunked = ClassReward(target=7, vq=vq, batch_size=2)
    torch.testing.assert_close(chunked(x), reward(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward(x[1:2]), reward(x)[1:2], rtol=1e-5, atol=1e-5)


def test_class_reward_is_the_classifier_log_probability(vq, reward):
    x = ids(4)
    with torch.no_grad():
        logits = reward.classifier(vq.decode(x))
    expected = torch.log_softmax(logits, -1)[:, 7].double()
    torch.testing.assert_close(reward(x), expected, rtol=0, atol=1e-6)
    clamped = ClassReward(target=7, vq=vq, clamp_min=float(expected.median()))
    torch.testing.assert_close(clamped(x), expected.clamp_min(float(expected.median())))
    assert reward.success_threshold == pytest.approx(math.log(0.5))
    assert torch.equal(reward.success(x), expected.exp() > 0.5)


def test_hard_one_hot_equals_ids_and_extra_columns_are_ignored(reward):
    x = ids(3)
    soft = torch.nn.functional.one_hot(x, V).float()
    torch.testing.assert_close(reward(soft), reward(x), rtol=0, atol=1e-5)
    padded = torch.nn.functional.one_hot(x, V + 5).float()  # a padded vocabulary
    padded[..., CODES:] = 0.3  # mass on the mask and padded ids is ignored
    torch.testing.assert_close(reward(padded), reward(x), rtol=0, atol=1e-5)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.flatten(1).norm(dim=1)[:, None, None]


def test_gradient_matches_a_finite_difference_directional_derivative(reward):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, L, V, generator=g)
    logits[..., CODES] = -torch.inf  # the mask column carries no mass, as in GradientProposal
    s = torch.softmax(logits, -1).requires_grad_(True)
    value = reward(s)
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert torch.isfinite(grad).all() and grad[..., :CODES].abs().sum() > 0
    assert (grad[..., CODES] == 0).all()
    # a unit direction between the gradient's and a random one (float32 limits the precision:
    # the decoder's and classifier's ReLU / clamp kinks bend the reward within a few eps)
    d = torch.randn(2, L, V, generator=g)
    d[..., CODES] = 0
    d = _unit(_unit(grad) + _unit(d))
    eps = 3e-3
    with torch.no_grad():
        fd = (reward(s + eps * d) - reward(s - eps * d)) / (2 * eps)
    analytic = (grad * d).sum((1, 2)).double()
    assert (analytic > 1.0).all()  # a real slope, well above the rounding of fd
    torch.testing.assert_close(fd, analytic, rtol=3e-2, atol=0)


def test_holdout_uses_another_classifier_and_never_steers(vq, reward):
    holdout = HoldoutClassReward(7, vq=vq)
    assert holdout.classifier.config.channels != reward.classifier.config.channels
    assert not torch.allclose(holdout(ids(4)), reward(ids(4)))
    assert not holdout.differentiable and reward.differentiable
    with pytest.raises(ValueError, match="not differentiable"):
        GradientProposal(holdout, alpha=0.1)


def test_bad_inputs_and_arguments_are_named_errors(vq, reward):
    mask = torch.full((2, L), CODES)
    with pytest.raises(ValueError, match="codebook holds"):
        reward(mask)
    with pytest.raises(ValueError, match="expected"):
        reward(ids(2)[:, :10])
    with pytest.raises(ValueError, match="V >= the codebook size"):
        reward(torch.rand(2, L, CODES - 1))
    with pytest.raises(ValueError, match="non-finite"):
        reward(torch.full((2, L, V), math.nan))
    with pytest.raises(ValueError, match="target"):
        ClassReward(target=10, vq=vq)
    with pytest.raises(TypeError, match="not differentiable"):
        JpegCompressibility(vq)(torch.rand(2, L, V))
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_vq("no/such/folder")


def test_vq_resolution_embedded_and_image_model(vq):
    embedded = resolve_vq("embedded")
    assert embedded.codebook_size == 256 and embedded.grid_shape == (7, 7)
    assert resolve_vq(ImageModel(denoiser=None, vq=vq)) is vq  # type: ignore[arg-type]


# ---- JPEG -----------------------------------------------------------------------------------------
def test_jpeg_constant_image_compresses_better_than_noise(vq):
    constant = torch.full((1, 1, 28, 28), 0.5)
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images = torch.cat([constant, noise])
    sizes = jpeg_sizes_kb(images)
    assert sizes[0] < sizes[1]
    assert torch.equal(jpeg_sizes_kb(images.expand(-1, 3, -1, -1)) > 0, torch.tensor([True] * 2))
    comp, incomp = JpegCompressibility(vq), JpegIncompressibility(vq)
    assert comp.score_images(images)[0] > comp.score_images(images)[1]  # smaller file: higher
    torch.testing.assert_close(incomp.score_images(images), -comp.score_images(images))
    torch.testing.assert_close(incomp(ids(2)), -comp(ids(2)))


# ---- adapters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "pip_name"),
    [
        (lambda vq, d: LaionAesthetic(d, vq=vq), "open_clip_torch"),
        (lambda vq, d: HPSv2Score(d, "a sneaker", vq=vq), "hpsv2"),
        (lambda vq, d: ImageRewardScore(d, "a sneaker", vq=vq), "image-reward"),
    ],
)
def test_adapters_without_their_package_say_pip_install(vq, tmp_path, make, pip_name, monkeypatch):
    for module in ("open_clip", "hpsv2", "ImageReward"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails even if installed
    with pytest.raises(ImportError, match=f"pip install {pip_name}"):
        make(vq, tmp_path)


@pytest.mark.parametrize(
    ("make", "module", "pip_name", "file"),
    [
        (lambda vq, d: LaionAesthetic(d, vq=vq), "open_clip", "open_clip_torch", "sac+logos"),
        (lambda vq, d: HPSv2Score(d, "x", vq=vq), "hpsv2", "hpsv2", "HPS_v2.1_compressed.pt"),
        (
            lambda vq, d: ImageRewardScore(d, "x", vq=vq),
            "ImageReward",
            "image-reward",
            "ImageReward.pt",
        ),
    ],
)
def test_adapters_without_their_weights_name_package_and_file(
    vq, tmp_path, make, module, pip_name, file, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    with pytest.raises(FileNotFoundError, match=f"{pip_name} weight file '{re.escape(file)}"):
        make(vq, tmp_path)


def test_clip_preprocess_resizes_and_normalizes():
    grey = torch.full((2, 1, 28, 28), 0.5)
    x = clip_preprocess(grey)
    assert x.shape == (2, 3, 224, 224)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 100, 100], expected, rtol=0, atol=1e-5)
    assert clip_preprocess(torch.rand(1, 3, 30, 40)).shape == (1, 3, 224, 224)


class _FakeClip(torch.nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean((2, 3)))


def test_aesthetic_head_loads_laion_keys_and_scores_with_an_injected_encoder(vq, tmp_path):
    torch.manual_seed(0)
    head = AestheticHead()
    assert sorted(head.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]
    assert {k.split(".")[1] for k in head.state_dict()} == {"0", "2", "4", "6", "7"}
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)
    loaded = AestheticHead.from_file(path)
    e = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    torch.testing.assert_close(loaded(e), head.eval()(e))
    aesthetic = LaionAesthetic(vq=vq, encoder=_FakeClip(), head=loaded)
    value = aesthetic(ids(3))
    assert value.shape == (3,) and value.dtype == torch.float64 and torch.isfinite(value).all()


# ---- SMCgrad on images ------------------------------------------------------------------------------
def tiny_denoiser(seed: int = 0) -> MeissonicDenoiser:
    torch.manual_seed(seed)
    transformer = MeissonicClassTransformer(
        num_classes=CLASSES,
        num_class_tokens=2,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
        vocab_size=V,
        codebook_size=CODES,
    )
    return MeissonicDenoiser(transformer, (7, 7)).eval()


def test_smcgrad_samples_codebook_ids_on_a_tiny_image_denoiser(reward):
    denoiser = tiny_denoiser()
    method = Method(
        name="SMCgrad",
        num_particles=3,
        num_steps=4,
        resample_when="always",
        potential=RewardTiltSpec(alpha=0.5),
        proposal=GradientProposalSpec(tau=1.0),
    )
    sampler = build_sampler(method, denoiser, reward=reward)
    assert isinstance(sampler.proposal, GradientProposal)
    labels = torch.tensor([0, 3])
    out = sampler.sample(L, batch_size=2, cond=labels, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape[-1] == L and out.tokens.numel() == 2 * 3 * L
    assert ((out.tokens >= 0) & (out.tokens < CODES)).all()
    assert torch.isfinite(out.log_weights).all()
    assert torch.isfinite(reward(out.tokens.reshape(-1, L))).all()
    # the gradient tilt changes the draws: scale 0 is the base kernel
    base = Method(**{**vars(method), "proposal": GradientProposalSpec(tau=1.0, scale=0.0)})
    same_seed = build_sampler(base, denoiser, reward=reward).sample(
        L, batch_size=2, cond=labels, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(same_seed.tokens, out.tokens)


def test_image_rewards_are_exported_lazily():
    import lightning_smc.rewards as rewards

    assert rewards.ClassReward is ClassReward and rewards.LaionAesthetic is LaionAesthetic
    assert "HPSv2Score" in rewards.__all__


def test_class_reward_from_a_yaml_reward_block():
    from jsonargparse import ArgumentParser

    from lightning_smc.rewards import BaseReward

    parser = ArgumentParser()
    parser.add_argument("--reward", type=BaseReward)
    block = '{"class_path": "lightning_smc.rewards.ClassReward", "init_args": {"target": 7, "clamp_min": -10}}'
    reward = parser.instantiate(parser.parse_args(["--reward", block])).reward
    assert isinstance(reward, ClassReward) and reward.clamp_min == -10.0
    assert reward.vq.codebook_size == 256  # vq: embedded, the packaged tokenizer
