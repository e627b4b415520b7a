"""Bad input to the sampler, its potentials and proposals (issue 12, items 2, 3, 5 and 6).

Every case fails with a named exception whose message names the argument (or the denoiser,
the step and the term); none returns NaN or a silently wrong result. The property tests run
the sampler on random small denoisers with random settings and check what every run must
satisfy: weights finite and normalized, ancestors in range, no mask left, ``log Ẑ`` finite.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_smc as ls
from lightning_smc.diffusion import ReMDM
from lightning_smc.sampling.checks import log_prob_tolerance

V, MASK, L = 5, 4, 6  # toy vocabulary: ids 0..3 and the mask


class Toy:
    """Random logits that depend on the input (so weights vary), mask column ``-inf``."""

    vocab_size, mask_id = V, MASK

    def __init__(self, seed: int = 0, scale: float = 2.0, columns: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V + 1, L + 1, V, generator=g, dtype=torch.float64) * scale
        self.columns = V if columns is None else columns

    def logits(self, x_t: torch.Tensor) -> torch.Tensor:
        R, n = x_t.shape
        last = torch.cat([x_t.new_full((R, 1), MASK), x_t[:, :-1]], dim=1)  # previous token
        out = self.table[last, torch.arange(n).clamp_max(L)].float()
        out[..., MASK] = -torch.inf
        return out

    def __call__(self, x_t, t, cond=None):
        out = self.logits(x_t)
        if self.columns != V:
            pad = torch.zeros(*out.shape[:-1], abs(self.columns - V))
            out = torch.cat([out, pad], -1) if self.columns > V else out[..., : self.columns]
        return out


class Shaped(Toy):
    """Returns ``logits`` reshaped by ``fn``."""

    def __init__(self, fn, **kw):
        super().__init__(**kw)
        self.fn = fn

    def __call__(self, x_t, t, cond=None):
        return self.fn(self.logits(x_t))


class DeclaresLogProbs(Toy):
    outputs_log_probs = True

    def __init__(self, normalize: bool, **kw):
        super().__init__(**kw)
        self.normalize = normalize

    def __call__(self, x_t, t, cond=None):
        out = self.logits(x_t) + 3.0
        return torch.log_softmax(out, -1) if self.normalize else out


class NaNAfter(Toy):
    """Finite logits at the first call, NaN from the second one on."""

    calls = 0

    def __call__(self, x_t, t, cond=None):
        self.calls += 1
        out = self.logits(x_t)
        return out if self.calls == 1 else torch.full_like(out, math.nan)


class TimeConditioned(Toy):
    time_conditioning = True


class Labelled(Toy):
    """Uses ``cond`` (a tensor or a dict with ``"label"``) as a per-row bias."""

    def __call__(self, x_t, t, cond=None):
        label = cond["label"] if isinstance(cond, dict) else cond
        if label is None:
            return self.logits(x_t)
        return self.logits(x_t) + label.view(-1, 1, 1).float() * 0.1


def reward_sum(x):
    return (x == 1).double().sum(-1)


def reward_huge(x):  # finite, but r / alpha overflows for alpha < 1
    return 1e307 * (1.0 + (x == 1).double().sum(-1))


def reward_nan(x):
    return torch.full((x.shape[0],), math.nan, dtype=torch.float64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(sampler_kwargs=None, denoiser=None, **sample_kwargs):
    sampler = ls.SMCSampler(denoiser or Toy(), **{"num_steps": 3, **(sampler_kwargs or {})})
    sample_kwargs.setdefault("generator", gen())
    return sampler.sample(**{"seq_len": L, **sample_kwargs})


# ---------------------------------------------------------------------- constructor arguments
CONSTRUCTOR = {
    # name: (kwargs, exception, match)
    "num_particles=2.5": (dict(num_particles=2.5), TypeError, "num_particles"),
    "num_particles=True": (dict(num_particles=True), TypeError, "num_particles"),
    "num_particles='4'": (dict(num_particles="4"), TypeError, "num_particles"),
    "num_particles=0": (dict(num_particles=0), ValueError, "num_particles"),
    "num_steps=2.0": (dict(num_steps=2.0), TypeError, "num_steps"),
    "num_steps=0": (dict(num_steps=0), ValueError, "num_steps"),
    "temperature=nan": (dict(temperature=math.nan), ValueError, "temperature"),
    "temperature=inf": (dict(temperature=math.inf), ValueError, "temperature"),
    "temperature=-1": (dict(temperature=-1.0), ValueError, "temperature"),
    "top_p=nan": (dict(top_p=math.nan), ValueError, "top_p"),
    "top_p=0": (dict(top_p=0.0), ValueError, "top_p"),
    "top_p=1.5": (dict(top_p=1.5), ValueError, "top_p"),
    "ess_threshold=nan": (dict(ess_threshold=math.nan), ValueError, "ess_threshold"),
    "ess_threshold=inf": (dict(ess_threshold=math.inf), ValueError, "ess_threshold"),
    "ess_threshold=0": (dict(ess_threshold=0.0), ValueError, "ess_threshold"),
    "ess_threshold=1.5": (dict(ess_threshold=1.5), ValueError, "ess_threshold"),
    "ess_threshold+resample_when": (
        dict(ess_threshold=0.3, resample_when="every:2"),
        ValueError,
        r"ess_threshold=0\.3 and resample_when='every:2'",
    ),
    "resample_when=sometimes": (dict(resample_when="sometimes"), ValueError, "resample_when"),
    "resample_when=every:0": (dict(resample_when="every:0"), ValueError, "resample_when"),
    "resampling=bogus": (dict(resampling="bogus"), ValueError, "bogus"),
    "unmasking=bogus": (dict(unmasking="bogus"), ValueError, "bogus"),
    "confidence_threshold=nan": (
        dict(unmasking="threshold", confidence_threshold=math.nan),
        ValueError,
        "threshold",
    ),
    "confidence_threshold=1.5": (
        dict(unmasking="threshold", confidence_threshold=1.5),
        ValueError,
        "threshold",
    ),
    "remdm eta=nan": ({}, ValueError, "eta"),  # ReMDM(eta=nan), below
    "potential=not a Potential": (dict(potential=object()), TypeError, "potential"),
    "proposal=not a Proposal": (dict(proposal=object()), TypeError, "proposal"),
    "cache with time conditioning": (dict(cache=True), ValueError, "cache"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR))
def test_constructor_rejects(case):
    kwargs, error, match = CONSTRUCTOR[case]
    denoiser = TimeConditioned() if case == "cache with time conditioning" else Toy()
    with pytest.raises(error, match=match):
        if case == "remdm eta=nan":
            ReMDM(eta=math.nan)
        ls.SMCSampler(denoiser, **kwargs)


def test_ess_threshold_alone_and_resample_when_alone_are_fine():
    assert ls.SMCSampler(Toy(), ess_threshold=0.3).strategy is not None
    assert ls.SMCSampler(Toy(), resample_when="every:2").strategy is not None


# ---------------------------------------------------------------------- potentials, proposals
def _product_other_vocab():
    class Other(Toy):
        vocab_size = V + 1

    ls.SMCSampler(Toy(), potential=ls.ProductTarget(0.5, Other()))


POTENTIALS = {
    "SelfReward(beta=nan)": (lambda: ls.SelfReward(beta=math.nan), ValueError, "beta"),
    "SelfReward(beta=inf)": (lambda: ls.SelfReward(beta=math.inf), ValueError, "beta"),
    "SelfReward(beta=-1)": (lambda: ls.SelfReward(beta=-1.0), ValueError, "beta"),
    "SelfReward(beta='1')": (lambda: ls.SelfReward(beta="x"), ValueError, "beta"),
    "RewardTilt(alpha=inf)": (
        lambda: ls.RewardTilt(reward_sum, alpha=math.inf),
        ValueError,
        "alpha",
    ),
    "RewardTilt(alpha=nan)": (
        lambda: ls.RewardTilt(reward_sum, alpha=math.nan),
        ValueError,
        "alpha",
    ),
    "RewardTilt(alpha=0)": (lambda: ls.RewardTilt(reward_sum, alpha=0.0), ValueError, "alpha"),
    "RewardTilt(alpha=-1)": (lambda: ls.RewardTilt(reward_sum, alpha=-1.0), ValueError, "alpha"),
    "RewardTilt(alpha=1e-320)": (
        lambda: ls.RewardTilt(reward_sum, alpha=1e-320),
        ValueError,
        "alpha.*overflows",
    ),
    "RewardTilt(num_samples=2.5)": (
        lambda: ls.RewardTilt(reward_sum, num_samples=2.5),
        TypeError,
        "num_samples",
    ),
    "RewardTilt(num_samples=-1)": (
        lambda: ls.RewardTilt(reward_sum, num_samples=-1),
        ValueError,
        "num_samples",
    ),
    "RewardTilt(schedule='cosine')": (
        lambda: ls.RewardTilt(reward_sum, schedule="cosine"),
        ValueError,
        "schedule",
    ),
    "ProductTarget(weight=nan)": (lambda: ls.ProductTarget(math.nan), ValueError, "weight"),
    "ProductTarget(weight=inf)": (lambda: ls.ProductTarget(math.inf), ValueError, "weight"),
    "ProductTarget(weight=0)": (lambda: ls.ProductTarget(0.0), ValueError, "weight"),
    "ProductTarget(other vocab)": (_product_other_vocab, ValueError, "vocab_size"),
    "GradientProposal(tau=0)": (lambda: ls.GradientProposal(tau=0.0), ValueError, "tau"),
    "GradientProposal(tau=nan)": (lambda: ls.GradientProposal(tau=math.nan), ValueError, "tau"),
    "GradientProposal(scale=-1)": (lambda: ls.GradientProposal(scale=-1.0), ValueError, "scale"),
    "GradientProposal(alpha=inf)": (
        lambda: ls.GradientProposal(alpha=math.inf),
        ValueError,
        "alpha",
    ),
    "GradientProposal(non-differentiable reward)": (
        lambda: ls.GradientProposal(reward=reward_sum, alpha=1.0),
        ValueError,
        "differentiable",
    ),
    "GradientProposal without a tilt": (
        lambda: ls.SMCSampler(Toy(), proposal=ls.GradientProposal()),
        ValueError,
        "reward",
    ),
}


@pytest.mark.parametrize("case", list(POTENTIALS))
def test_potentials_and_proposals_reject(case):
    build, error, match = POTENTIALS[case]
    with pytest.raises(error, match=match):
        build()


# ---------------------------------------------------------------------- sample() arguments
SAMPLE = {
    "generator=0": (dict(generator=0), TypeError, "generator"),
    "generator='seed'": (dict(generator="seed"), TypeError, "generator"),
    "generator=[g, 0]": (dict(generator=[gen(), 0]), TypeError, "generator"),
    "3 generators for 2 prompts": (
        dict(batch_size=2, generator=[gen(), gen(1), gen(2)]),
        ValueError,
        "generators",
    ),
    "float prompt": (dict(prompt=torch.tensor([[1.0, 2.7]])), TypeError, "prompt.*float32"),
    "bool prompt": (dict(prompt=torch.tensor([[True, False]])), TypeError, "prompt.*bool"),
    "list prompt": (dict(prompt=[[1, 2]]), TypeError, "prompt"),
    "1-d prompt": (dict(prompt=torch.tensor([1, 2])), ValueError, "prompt"),
    "prompt with the mask token": (dict(prompt=torch.tensor([[1, MASK]])), ValueError, "infill"),
    "prompt id out of range": (dict(prompt=torch.tensor([[1, 9]])), ValueError, "prompt"),
    "negative prompt id": (dict(prompt=torch.tensor([[1, -1]])), ValueError, "prompt"),
    "prompt as long as seq_len": (
        dict(prompt=torch.zeros(1, L, dtype=torch.long)),
        ValueError,
        "prompt length",
    ),
    "batch_size differs from prompt": (
        dict(batch_size=3, prompt=torch.tensor([[1, 2]])),
        ValueError,
        "batch_size",
    ),
    "seq_len=0": (dict(seq_len=0), ValueError, "seq_len"),
    "seq_len=2.5": (dict(seq_len=2.5), TypeError, "seq_len"),
    "batch_size=0": (dict(batch_size=0), ValueError, "batch_size"),
    "batch_size=1.5": (dict(batch_size=1.5), TypeError, "batch_size"),
    "cond batch differs": (dict(batch_size=2, cond=torch.tensor([1, 2, 3])), ValueError, "cond"),
    "cond dict entry batch differs": (
        dict(batch_size=2, cond={"label": torch.tensor([1])}),
        ValueError,
        r"cond\['label'\]",
    ),
    "cond scalar": (dict(batch_size=2, cond=torch.tensor(1)), ValueError, "cond"),
}


@pytest.mark.parametrize("case", list(SAMPLE))
def test_sample_rejects(case):
    kwargs, error, match = SAMPLE[case]
    with pytest.raises(error, match=match):
        run(dict(num_particles=2), denoiser=Labelled(), **kwargs)


def test_prompt_with_mask_is_infilled_when_asked():
    prompt = torch.tensor([[1, MASK, 2]])
    out = run(dict(num_particles=2), prompt=prompt, infill=True)
    assert (out.tokens[:, :, [0, 2]] == torch.tensor([1, 2])).all()
    assert not (out.tokens == MASK).any()


def test_dict_cond_with_the_right_batch_is_fine():
    out = run(
        dict(num_particles=2),
        denoiser=Labelled(),
        batch_size=2,
        cond={"label": torch.tensor([1, 2])},
    )
    assert out.tokens.shape == (2, 2, L)


# ---------------------------------------------------------------------- the denoiser's output
OUTPUTS = {
    "[R, L+1, V] logits": (
        Shaped(lambda o: torch.cat([o, o[:, :1]], 1)),
        ValueError,
        r"Shaped returned shape \[2, 7, 5\], expected .*\[2, 6, 5\].*positions",
    ),
    "extra vocabulary columns": (
        Toy(columns=V + 3),
        ValueError,
        r"8 vocabulary columns.*vocab_size=5",
    ),
    "vocab_size=10 with 4 columns": (
        type("Ten", (Toy,), {"vocab_size": 10})(columns=4),
        ValueError,
        r"Ten returned shape \[2, 6, 4\], expected .*\[2, 6, 10\]",
    ),
    "[R, V] output": (Shaped(lambda o: o[:, 0]), ValueError, "expected"),
    "a list": (Shaped(lambda o: o.tolist()), TypeError, "returned list"),
    "integer logits": (Shaped(lambda o: o.clamp(-9, 9).long()), TypeError, "dtype"),
    "NaN logits": (Shaped(lambda o: o * math.nan), ValueError, "NaN"),
    "+inf logits": (Shaped(lambda o: o.clamp_min(0) * math.inf), ValueError, r"\+inf"),
    "outputs_log_probs but logits": (
        DeclaresLogProbs(normalize=False),
        ValueError,
        "outputs_log_probs.*logits, not log-probabilities",
    ),
}


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("case", list(OUTPUTS))
def test_denoiser_output_is_checked_at_the_first_forward(case, cache):
    denoiser, error, match = OUTPUTS[case]
    with pytest.raises(error, match=match):
        run(dict(num_particles=2, cache=cache), denoiser=denoiser)


def test_declared_log_probs_that_are_normalized_pass():
    out = run(dict(num_particles=3, potential=ls.SelfReward()), denoiser=DeclaresLogProbs(True))
    assert torch.isfinite(out.log_weights).all()
    # half precision: the tolerance grows with eps and log V
    assert log_prob_tolerance(torch.bfloat16, 50_000) > log_prob_tolerance(torch.float32, 50_000)


def test_second_denoiser_of_a_product_is_checked():
    target = ls.ProductTarget(0.5, Toy(columns=V + 1))
    target.second_denoiser.vocab_size = V  # declares V, returns V + 1 columns
    with pytest.raises(ValueError, match="6 vocabulary columns"):
        run(dict(num_particles=2, potential=target))


# ---------------------------------------------------------------------- no NaN, ever
def _weight_error(match, **sampler_kwargs):
    with pytest.raises(ls.WeightError, match=match):
        run({"num_particles": 3, **sampler_kwargs})


def test_twist_schedule_returning_nan_names_the_schedule():
    tilt = ls.RewardTilt(reward_sum, alpha=0.5, schedule=lambda p: math.nan if p > 0 else 0.0)
    with pytest.raises(ValueError, match=r"RewardTilt schedule\(0\.3333\) must be a finite"):
        run(dict(num_particles=3, potential=tilt))


def test_gradient_proposal_schedule_returning_nan_names_the_schedule():
    class Soft:
        differentiable = True

        def __call__(self, x):
            if x.dim() == 3:
                return x[..., 1].sum(-1)
            return (x == 1).double().sum(-1)

    proposal = ls.GradientProposal(Soft(), alpha=1.0, schedule=lambda p: math.nan)
    tilt = ls.RewardTilt(Soft(), alpha=1.0)
    with pytest.raises(ValueError, match="GradientProposal schedule"):
        run(dict(num_particles=2, potential=tilt, proposal=proposal))


def test_huge_reward_overflowing_r_over_alpha_names_the_twist():
    tilt = ls.RewardTilt(reward_huge, alpha=0.1)
    _weight_error(r"log-weight became inf at step 1 .* twist", potential=tilt)


def test_huge_reward_with_greedy_twist_names_the_twist():
    tilt = ls.RewardTilt(reward_huge, alpha=0.1, schedule="constant", num_samples=0)
    _weight_error(r"at step 0 .* twist", potential=tilt)


def test_huge_final_reward_names_the_final_twist():
    class Late:  # finite until the sequence is complete
        def __call__(self, x):
            done = (x != MASK).all(-1)
            return done.double() * 1e308

    tilt = ls.RewardTilt(Late(), alpha=0.1, schedule=lambda p: 0.0)
    _weight_error("at the end of the run .* final twist", potential=tilt)


def test_selfreward_beta_so_large_that_every_weight_is_zero():
    flat = Toy(scale=0.1)  # log p ~ -log 4 per token: (1 + beta) * log p overflows to -inf
    with pytest.raises(ls.WeightError, match=r"every particle of prompt 0 has log-weight -inf"):
        run(dict(num_particles=3, potential=ls.SelfReward(1e308)), denoiser=flat)


def test_reward_returning_nan_names_the_reward():
    with pytest.raises(ValueError, match="reward reward_nan returned a non-finite"):
        run(dict(num_particles=2, potential=ls.RewardTilt(reward_nan)))


@pytest.mark.parametrize("potential", [None, ls.SelfReward(), ls.ProductTarget(2.0)])
def test_denoiser_turning_nan_later_is_an_error(potential):
    with pytest.raises(ValueError, match="NaN"):
        run(dict(num_particles=2, potential=potential), denoiser=NaNAfter())


def test_weight_error_is_a_value_error():
    assert issubclass(ls.WeightError, ValueError)


# ---------------------------------------------------------------------- properties
@st.composite
def settings_strategy(draw):
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["exact", "toy", "log_probs"]))
    N = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 5))
    unmasking = draw(
        st.sampled_from(["ancestral", "random", "low_confidence", "threshold", "remdm"])
    )
    resampling = draw(st.sampled_from(["systematic", "multinomial", "stratified", "residual"]))
    when = draw(st.sampled_from([None, "always", "every:2", "never", "block"]))
    potential = draw(st.sampled_from(["none", "self", "tilt0", "tilt1", "product"]))
    block = draw(st.sampled_from([None, 2]))
    temperature = draw(st.sampled_from([1.0, 0.7]))
    cache = draw(st.booleans())
    return dict(
        cache=cache,
        seed=seed,
        kind=kind,
        N=N,
        B=B,
        steps=steps,
        unmasking=unmasking,
        resampling=resampling,
        when=when,
        potential=potential,
        block=block,
        temperature=temperature,
    )


def _build(s):
    g = torch.Generator().manual_seed(s["seed"])
    if s["kind"] == "exact":
        length = 3
        joint = torch.rand(3, 3, 3, generator=g, dtype=torch.float64) ** 3 + 1e-3
        denoiser = ls.ExactDenoiser(joint)
    elif s["kind"] == "toy":
        length = L
        denoiser = Toy(seed=s["seed"], scale=3.0)
    else:
        length = L
        denoiser = DeclaresLogProbs(True, seed=s["seed"])
    potential = {
        "none": None,
        "self": ls.SelfReward(beta=1.0),
        "tilt0": ls.RewardTilt(reward_sum, alpha=0.5, num_samples=0),
        "tilt1": ls.RewardTilt(reward_sum, alpha=0.3, schedule="linear"),
        "product": ls.ProductTarget(1.5),
    }[s["potential"]]
    block = s["block"] if s["block"] and s["block"] < length else None
    blocks = -(-length // block) if block else 1  # each block gets the same number of steps
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=s["N"],
        num_steps=s["steps"] * blocks,
        unmasking=s["unmasking"],
        block_length=block,
        temperature=s["temperature"],
        potential=potential,
        resampling=s["resampling"],
        resample_when=s["when"],
        cache=s["cache"],
    )
    return sampler, length, denoiser.mask_id


@settings(max_examples=40, deadline=None, derandomize=True)
@given(settings_strategy())
def test_every_run_has_finite_normalized_weights_and_no_mask_left(s):
    sampler, length, mask_id = _build(s)
    out = sampler.sample(seq_len=length, batch_size=s["B"], generator=gen(s["seed"]))
    B, N = s["B"], s["N"]
    assert out.tokens.shape == (B, N, length)
    assert not (out.tokens == mask_id).any(), "no mask left"
    assert ((out.tokens >= 0) & (out.tokens < mask_id)).all()
    w = out.log_weights
    assert not torch.isnan(w).any() and not torch.isposinf(w).any()
    assert torch.isfinite(w).any(-1).all(), "every prompt keeps a particle of finite weight"
    assert torch.allclose(w.logsumexp(-1), torch.zeros(B, dtype=w.dtype), atol=1e-9)
    assert torch.isfinite(out.log_normalizer).all()
    assert ((out.ancestors >= 0) & (out.ancestors < N)).all()
    assert not torch.isnan(out.ess).any()
