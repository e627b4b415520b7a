"""Sampler contract: determinism, batch-composition independence, prompts, conditioning,
diagnostics and input validation."""

import math

import pytest
import torch
from exact import L, toy_joint

import lightning_smc as ls


def tiny(seed=0, vocab=12, max_len=24):
    torch.manual_seed(seed)
    return ls.TinyTransformerDenoiser(
        vocab_size=vocab, max_len=max_len, d_model=32, n_layers=1
    ).eval()


CONFIGS = {
    "plain-ancestral": dict(unmasking="ancestral"),
    "srsmc-lowconf": dict(unmasking="low_confidence", potential=ls.SelfReward(), num_particles=4),
    "srsmc-blocks": dict(
        unmasking="random",
        potential=ls.SelfReward(),
        num_particles=4,
        block_length=4,
        resample_when="block:0.9",
    ),
    "threshold": dict(
        unmasking="threshold",
        potential=ls.SelfReward(),
        num_particles=3,
        block_length=8,
        confidence_threshold=0.2,
    ),
    "tilt": dict(
        unmasking="ancestral",
        num_particles=4,
        resample_when="always",
        potential=ls.RewardTilt(lambda x: (x == 3).double().sum(-1), alpha=0.5, num_samples=2),
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_prompt_same_seed_alone_or_in_a_batch(name):
    kwargs = dict(num_steps=8, **CONFIGS[name])
    sampler = ls.SMCSampler(tiny(), **kwargs)
    prompts = torch.tensor([[1, 2], [4, 5], [7, 7]])
    seeds = [3, 7, 5]
    batch = sampler.sample(
        16, prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    alone = sampler.sample(16, prompt=prompts[1:2], generator=[torch.Generator().manual_seed(7)])
    assert torch.equal(batch.tokens[1], alone.tokens[0])
    # the draws are the same; weights are sums over the 14 generated tokens of float32 network
    # outputs, whose matmuls round differently with another batch size: allow one float32 ulp
    # per token (measured: 4e-7)
    ulps = 14 * torch.finfo(torch.float32).eps
    f32 = dict(rtol=ulps, atol=ulps)
    torch.testing.assert_close(batch.log_weights[1], alone.log_weights[0], **f32)
    torch.testing.assert_close(batch.log_normalizer[1], alone.log_normalizer[0], **f32)
    assert torch.equal(batch.ancestors[1], alone.ancestors[0])
    again = sampler.sample(
        16, prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    assert torch.equal(batch.tokens, again.tokens)  # deterministic


def test_single_generator_is_deterministic_and_seed_sensitive():
    sampler = ls.SMCSampler(tiny(), num_particles=4, num_steps=8, potential=ls.SelfReward())
    a = sampler.sample(16, batch_size=2, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(16, batch_size=2, generator=torch.Generator().manual_seed(0))
    c = sampler.sample(16, batch_size=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_prompt_is_kept_and_diagnostics_have_documented_shapes():
    sampler = ls.SMCSampler(
        tiny(), num_particles=5, num_steps=6, unmasking="random", potential=ls.SelfReward()
    )
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = sampler.sample(12, prompt=prompt, generator=torch.Generator().manual_seed(0))
    B, N, T = 2, 5, 6
    assert out.tokens.shape == (B, N, 12) and (out.tokens[:, :, :3] == prompt.unsqueeze(1)).all()
    assert out.log_weights.dtype == torch.float64
    torch.testing.assert_close(
        torch.logsumexp(out.log_weights, -1), torch.zeros(B, dtype=torch.float64)
    )
    assert (
        out.ess.shape == (B, T)
        and out.resampled.shape == (B, T)
        and out.ancestors.shape == (B, T, N)
    )
    assert ((out.ess >= 1 - 1e-9) & (out.ess <= N + 1e-9)).all()
    assert not out.resampled[:, -1].any()
    assert out.nfe == T and out.overtakes.shape == (B,)
    assert out.best().shape == (B, 12)
    assert (out.tokens != sampler.denoiser.mask_id).all()


def test_resampling_events_reset_weights_and_follow_ancestors():
    p0 = toy_joint(0)
    sampler = ls.SMCSampler(
        ls.ExactDenoiser(p0),
        num_particles=6,
        num_steps=L,
        unmasking="random",
        potential=ls.SelfReward(),
        resample_when="always",
    )
    out = sampler.sample(L, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert out.resampled[:, :-1].all()
    lineage = out.lineage(torch.zeros(3, dtype=torch.long))
    assert lineage.shape == (3, L) and (lineage[:, -1] == 0).all()
    assert torch.isfinite(out.log_weights).all()


def test_best_of_n_ranks_by_a_score():
    sampler = ls.SMCSampler(tiny(), num_particles=8, num_steps=8)
    out = sampler.sample(16, batch_size=2, generator=torch.Generator().manual_seed(0))
    score = lambda x: (x == 3).double().sum(-1)  # noqa: E731
    best = out.best(score)
    assert torch.equal(score(best), score(out.tokens.reshape(-1, 16)).reshape(2, 8).max(-1).values)
    torch.testing.assert_close(out.log_weights, torch.full_like(out.log_weights, -math.log(8.0)))


def test_overtakes_count_resamples_where_the_final_best_was_behind():
    p0 = toy_joint(1)
    sampler = ls.SMCSampler(
        ls.ExactDenoiser(p0),
        num_particles=8,
        num_steps=L,
        unmasking="random",
        potential=ls.SelfReward(),
        resample_when="always",
    )
    out = sampler.sample(L, batch_size=200, generator=torch.Generator().manual_seed(0))
    assert (out.overtakes <= out.resampled.sum(-1)).all()
    assert out.overtakes.sum() > 0  # with uniform weights after each resample, leaders change


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_particles=0), "num_particles"),
        (dict(num_steps=0), "num_steps"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(resampling="bogus"), "systematic"),
        (dict(unmasking="bogus"), "low_confidence"),
        (dict(resample_when="sometimes"), "every:K"),
        (dict(ess_threshold=1.5), "ess_threshold"),
    ],
)
def test_bad_sampler_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ls.SMCSampler(tiny(), **kwargs)


def test_bad_sample_arguments_are_named():
    sampler = ls.SMCSampler(tiny(), num_steps=4)
    with pytest.raises(ValueError, match="prompt length"):
        sampler.sample(4, prompt=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        sampler.sample(8, prompt=torch.full((1, 2), 99))
    with pytest.raises(ValueError, match="generators"):
        sampler.sample(8, batch_size=2, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        ls.SMCSampler(tiny(), num_steps=3, block_length=4).sample(8)
    with pytest.raises(ValueError, match="alpha"):
        ls.RewardTilt(lambda x: x.sum(-1).double(), alpha=0.0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x: torch.zeros(3), "shape"),
        (lambda x: torch.full((x.shape[0],), float("nan")), "non-finite"),
    ],
)
def test_bad_reward_output_is_an_error_not_a_weight(bad, match):
    sampler = ls.SMCSampler(
        tiny(),
        num_particles=2,
        num_steps=4,
        potential=ls.RewardTilt(bad, alpha=1.0, schedule="constant"),
    )
    with pytest.raises(ValueError, match=match):
        sampler.sample(8, batch_size=2)


def test_conditioning_reaches_the_denoiser_per_particle():
    seen = []

    class Recorder:
        vocab_size, mask_id = 4, 3

        def __call__(self, x_t, t, cond=None):
            seen.append(cond.clone())
            logits = torch.zeros(*x_t.shape, 4)
            logits[..., 3] = -torch.inf
            return logits

    sampler = ls.SMCSampler(Recorder(), num_particles=3, num_steps=2)
    sampler.sample(4, batch_size=2, cond=torch.tensor([10, 20]))  # one cond entry per prompt
    assert torch.equal(seen[0], torch.tensor([10, 10, 10, 20, 20, 20]))


def test_threshold_policy_finishes_blocks_early_and_reports_fewer_nfe():
    class Confident:
        vocab_size, mask_id = 5, 4

        def __call__(self, x_t, t, cond=None):
            logits = torch.full((*x_t.shape, 5), -10.0)
            logits[..., 0] = 10.0
            logits[..., 4] = -torch.inf
            return logits

    sampler = ls.SMCSampler(
        Confident(), num_steps=16, unmasking="threshold", block_length=4, confidence_threshold=0.9
    )
    out = sampler.sample(16, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 4 and (out.tokens == 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(unmasking="ancestral", num_steps=32),
        dict(
            unmasking="ancestral",
            num_steps=32,
            num_particles=4,
            potential=ls.SelfReward(),
            resample_when="always",
        ),
        dict(
            unmasking="random",
            num_steps=32,
            num_particles=3,
            potential=ls.RewardTilt(lambda x: (x == 2).double().sum(-1), alpha=1.0, num_samples=2),
        ),
    ],
    ids=["plain", "srsmc-resampling", "tilt"],
)
def test_cache_gives_identical_samples_with_fewer_evaluations(kwargs):
    p0 = toy_joint(3)
    denoiser = ls.ExactDenoiser(p0)
    plain = ls.SMCSampler(denoiser, **kwargs).sample(
        L, batch_size=5, generator=torch.Generator().manual_seed(0)
    )
    cached = ls.SMCSampler(denoiser, cache=True, **kwargs).sample(
        L, batch_size=5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(plain.tokens, cached.tokens)
    assert torch.equal(plain.log_weights, cached.log_weights)
    assert plain.nfe == kwargs["num_steps"] and cached.nfe < plain.nfe / 2


def test_cache_refuses_time_conditioned_denoisers():
    denoiser = ls.ExactDenoiser(toy_joint(0))
    denoiser.time_conditioning = True
    with pytest.raises(ValueError, match="time_conditioning"):
        ls.SMCSampler(denoiser, cache=True)
