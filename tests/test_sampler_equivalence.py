"""Sampler outputs across performance refactors of the sampler loop, on any machine.

``GOLDEN`` (``tests/goldens/sampler_equivalence.json``) holds, for each configuration below,
what ``SMCSampler.sample`` returned when it was recorded:

- the SHA-256 of its integer outputs (token ids, resampling flags, ancestors, overtakes) and its
  NFE count: compared **exactly** (they are the same on every CPU, thread count and kernel set);
- its float outputs (final log-weights, log Ẑ, the ESS trace) as numbers: compared with a
  tolerance derived from the computation (``golden_tolerance``: a few float ulps of the
  denoiser's dtype per accumulated log-probability), since another CPU, kernel set
  (``ATEN_CPU_CAPABILITY``) or thread count rounds the network's float32 outputs differently.

The values were first recorded (as digests of every byte) by running the sampler **before** the
overhead work (commit ea1d7ab: clone-based ``denoiser_log_probs``, out-of-place Gumbel-max,
``torch.cat`` in ``rand_at``, forward-then-resample loop with ``CachedDenoiser.reorder``);
re-recorded when token draws moved from Gumbel-max to ``inverse_cdf`` (an intended change of the
random stream), and once more, unchanged in value, in this portable format. Regenerate only for
an intended change of results: ``python tests/test_sampler_equivalence.py --write``.

``test_matches_reference_loop`` also runs a frozen copy of the pre-change loop
(``_ReferenceSampler``) side by side with the current sampler in the same process and compares
every output bit for bit (``torch.equal``): the same machine, kernels and threads give the same
bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tolerance import rounding_tolerance

import lightning_smc as ls
import lightning_smc.potentials as potentials_module
import lightning_smc.proposals as proposals_module
from lightning_smc.diffusion import inverse_cdf, proposal_log_probs
from lightning_smc.sampler import SMCSampler
from lightning_smc.sampling.context import StepContext
from lightning_smc.smc import RowGenerators, StepInfo, ess, rand_at

# --------------------------------------------------------------------------- configurations


def tiny(seed=0, vocab=12, max_len=24):
    torch.manual_seed(seed)
    return ls.TinyTransformerDenoiser(
        vocab_size=vocab, max_len=max_len, d_model=32, n_layers=1
    ).eval()


def joint(seed, V=3, L=4):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand((V,) * L, generator=g, dtype=torch.float64) ** 3 + 0.02
    return p / p.sum()


def count3(x):
    return (x == 3).double().sum(-1)


def count2(x):
    return (x == 2).double().sum(-1) - 0.7 * (x[..., 0] == x[..., -1]).double()


def _config(name):
    """``(denoiser, sampler kwargs, sample kwargs)`` for one configuration (fresh objects)."""
    g = {"generator": torch.Generator().manual_seed(11)}
    prompt = torch.tensor([[1, 2, 11, 4], [3, 5, 6, 11]])  # 11 = mask: infilling
    per_prompt = [torch.Generator().manual_seed(s) for s in (3, 9)]
    tiny_run = dict(seq_len=16, batch_size=2, **g)
    exact_run = dict(seq_len=4, batch_size=3, **g)
    table = {
        # --- TinyTransformerDenoiser
        "tiny-ancestral-plain": (tiny(), dict(num_steps=8), dict(tiny_run, batch_size=3)),
        "tiny-ancestral-selfreward-N4": (
            tiny(),
            dict(num_steps=8, num_particles=4, potential=ls.SelfReward(), ess_threshold=0.9),
            tiny_run,
        ),
        "tiny-random-blocks-selfreward": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="random",
                num_particles=4,
                potential=ls.SelfReward(),
                block_length=4,
                resample_when="block:0.9",
            ),
            tiny_run,
        ),
        "tiny-lowconf-selfreward": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="low_confidence",
                num_particles=4,
                potential=ls.SelfReward(beta=2.0),
                ess_threshold=0.9,
            ),
            tiny_run,
        ),
        "tiny-lowconf-blocks-prompt": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="low_confidence",
                num_particles=3,
                potential=ls.SelfReward(),
                block_length=4,
                resample_when="always",
            ),
            dict(seq_len=16, prompt=prompt, generator=per_prompt, infill=True),
        ),
        "tiny-threshold-blocks": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="threshold",
                confidence_threshold=0.07,  # some blocks finish early
                num_particles=3,
                potential=ls.SelfReward(),
                block_length=8,
                resample_when="always",
            ),
            tiny_run,
        ),
        "tiny-tilt-M2": (
            tiny(),
            dict(
                num_steps=8,
                num_particles=4,
                resample_when="always",
                potential=ls.RewardTilt(count3, alpha=0.5, num_samples=2),
            ),
            tiny_run,
        ),
        "tiny-tilt-greedy-lowconf": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="low_confidence",
                num_particles=4,
                resample_when="every:2",
                potential=ls.RewardTilt(count3, alpha=0.3, num_samples=0, schedule="constant"),
            ),
            tiny_run,
        ),
        "tiny-product": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="low_confidence",
                num_particles=4,
                resample_when="always",
                potential=ls.ProductTarget(weight=1.5, second_denoiser=tiny(seed=1)),
            ),
            tiny_run,
        ),
        "tiny-proposal-random": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="random",
                num_particles=4,
                resample_when="every:2",
                potential=ls.SelfReward(),
                proposal=ls.DenoiserProposal(tiny(seed=2)),
            ),
            tiny_run,
        ),
        "tiny-cache-ancestral": (
            tiny(),
            dict(
                num_steps=16,
                num_particles=4,
                potential=ls.SelfReward(),
                ess_threshold=0.9,
                cache=True,
            ),
            tiny_run,
        ),
        "tiny-cache-tilt": (
            tiny(),
            dict(
                num_steps=16,
                num_particles=4,
                resample_when="always",
                potential=ls.RewardTilt(count3, alpha=0.5, num_samples=2),
                cache=True,
            ),
            tiny_run,
        ),
        "tiny-temp-topp-lowconf": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="low_confidence",
                num_particles=4,
                potential=ls.SelfReward(),
                resample_when="always",
                temperature=0.7,
                top_p=0.9,
            ),
            tiny_run,
        ),
        "tiny-temp-topp-ancestral": (
            tiny(),
            dict(num_steps=8, num_particles=2, temperature=0.7, top_p=0.9, resample_when="always"),
            tiny_run,
        ),
        "tiny-greedy-random": (
            tiny(),
            dict(
                num_steps=8,
                unmasking="random",
                num_particles=2,
                temperature=0.0,
                potential=ls.SelfReward(),
                resample_when="always",
            ),
            tiny_run,
        ),
        # --- ExactDenoiser (float64 logits)
        "exact-random-selfreward": (
            ls.ExactDenoiser(joint(1)),
            dict(
                num_steps=4,
                unmasking="random",
                num_particles=8,
                potential=ls.SelfReward(),
                ess_threshold=0.9,
            ),
            exact_run,
        ),
        "exact-lowconf-selfreward": (
            ls.ExactDenoiser(joint(2)),
            dict(
                num_steps=2,
                unmasking="low_confidence",
                num_particles=8,
                potential=ls.SelfReward(),
                ess_threshold=1.0,
            ),
            exact_run,
        ),
        "exact-tilt-M2": (
            ls.ExactDenoiser(joint(3)),
            dict(
                num_steps=4,
                unmasking="random",
                num_particles=8,
                potential=ls.RewardTilt(count2, alpha=0.5, num_samples=2),
            ),
            exact_run,
        ),
        "exact-product-cond": (
            ls.ExactDenoiser(torch.stack([joint(4), joint(5)])),
            dict(
                num_steps=4,
                unmasking="random",
                num_particles=8,
                potential=ls.ProductTarget(weight=2.0, second_cond=None),
                ess_threshold=0.9,
            ),
            dict(exact_run, cond=torch.ones(3, dtype=torch.long)),
        ),
        "exact-proposal-ancestral": (
            ls.ExactDenoiser(joint(6)),
            dict(
                num_steps=4,
                num_particles=8,
                potential=ls.RewardTilt(count2, alpha=0.5, num_samples=1),
                proposal=ls.DenoiserProposal(ls.ExactDenoiser(joint(7))),
            ),
            exact_run,
        ),
        "exact-cache-threshold": (
            ls.ExactDenoiser(joint(8)),
            dict(
                num_steps=4,
                unmasking="threshold",
                confidence_threshold=0.3,
                num_particles=8,
                potential=ls.SelfReward(),
                cache=True,
                resample_when="always",
            ),
            exact_run,
        ),
    }
    return table[name]


CONFIG_NAMES = [
    "tiny-ancestral-plain",
    "tiny-ancestral-selfreward-N4",
    "tiny-random-blocks-selfreward",
    "tiny-lowconf-selfreward",
    "tiny-lowconf-blocks-prompt",
    "tiny-threshold-blocks",
    "tiny-tilt-M2",
    "tiny-tilt-greedy-lowconf",
    "tiny-product",
    "tiny-proposal-random",
    "tiny-cache-ancestral",
    "tiny-cache-tilt",
    "tiny-temp-topp-lowconf",
    "tiny-temp-topp-ancestral",
    "tiny-greedy-random",
    "exact-random-selfreward",
    "exact-lowconf-selfreward",
    "exact-tilt-M2",
    "exact-product-cond",
    "exact-proposal-ancestral",
    "exact-cache-threshold",
]


def run_config(name, sampler_cls=SMCSampler):
    denoiser, sampler_kwargs, sample_kwargs = _config(name)
    return sampler_cls(denoiser, **sampler_kwargs).sample(**sample_kwargs)


def digest(out: ls.SMCOutput) -> str:
    """SHA-256 of the integer outputs: token ids, resampling flags, ancestors, overtakes."""
    h = hashlib.sha256()
    for field in (out.tokens, out.resampled, out.ancestors, out.overtakes):
        t = field.detach().cpu().contiguous().to(torch.int64)
        h.update(f"{tuple(t.shape)}".encode() + t.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def record(out: ls.SMCOutput) -> dict:
    """What the golden file stores for one run."""
    return {
        "integers": digest(out),
        "nfe": float(out.nfe),
        "log_normalizer": out.log_normalizer.tolist(),
        "log_weights": out.log_weights.tolist(),
        "ess": out.ess.tolist(),
    }


def golden_tolerance(name: str, out: ls.SMCOutput) -> float:
    """Absolute tolerance on a log-weight or log Ẑ of configuration ``name`` across machines.

    A log-weight sums, over the ``L`` positions a particle generates, a target minus a
    reference log-probability (two rounded values of the denoiser's dtype, each of size about
    ``log V`` for a vocabulary of ``V``); normalizing over particles subtracts a logsumexp with
    the same error. Hence 4 ulps per term: ``4 * eps * L * log V`` (float32 for the tiny
    transformer: 1.9e-5; float64 for the exact denoisers). Twists and rewards are float64
    functions of the tokens, equal everywhere. Measured across AVX-512 / AVX2 / default kernels
    and 1 / 2 threads: at most 0.53 of this budget's per-term ulp (2.5e-6 on
    ``tiny-lowconf-selfreward``)."""
    denoiser, _, _ = _config(name)
    dtype = torch.float64 if name.startswith("exact") else torch.float32
    L = out.tokens.shape[-1]
    return rounding_tolerance(L, math.log(denoiser.vocab_size), dtype, ulps=4)


GOLDEN_FILE = Path(__file__).parent / "goldens" / "sampler_equivalence.json"
# missing only while it is first written (the tests then fail with a KeyError)
GOLDEN: dict[str, dict] = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}


def assert_matches_golden(out: ls.SMCOutput, golden: dict, tol: float) -> None:
    """Integers and NFE exactly; log-weights and log Ẑ to ``tol``; the ESS, whose relative
    error is at most twice the log-weights' (``ESS = 1 / sum W_i^2``), to ``2 * tol``."""
    assert digest(out) == golden["integers"], "token ids, resampling flags or ancestors differ"
    assert float(out.nfe) == golden["nfe"]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(out.log_weights, as_tensor(golden["log_weights"]), rtol=0, atol=tol)
    torch.testing.assert_close(
        out.log_normalizer, as_tensor(golden["log_normalizer"]), rtol=0, atol=tol
    )
    torch.testing.assert_close(out.ess, as_tensor(golden["ess"]), rtol=2 * tol, atol=0)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_outputs_match_golden(name):
    out = run_config(name)
    assert_matches_golden(out, GOLDEN[name], golden_tolerance(name, out))


def test_golden_comparison_catches_a_wrong_weight():
    """A log-weight off by 10x the tolerance, or one flipped ancestor, fails the comparison."""
    name = "tiny-ancestral-selfreward-N4"
    out = run_config(name)
    tol = golden_tolerance(name, out)
    assert_matches_golden(out, GOLDEN[name], tol)
    wrong = json.loads(json.dumps(GOLDEN[name]))
    wrong["log_weights"][1][2] += 10 * tol
    with pytest.raises(AssertionError):
        assert_matches_golden(out, wrong, tol)
    wrong = json.loads(json.dumps(GOLDEN[name]))
    wrong["ess"][0][3] *= 1 + 20 * tol
    with pytest.raises(AssertionError):
        assert_matches_golden(out, wrong, tol)
    flipped = out.ancestors.clone()
    flipped[0, 0, 0] = (flipped[0, 0, 0] + 1) % flipped.shape[-1]
    with pytest.raises(AssertionError, match="token ids"):
        assert_matches_golden(dataclasses.replace(out, ancestors=flipped), GOLDEN[name], tol)


# --------------------------------------------------------------------------- frozen reference
# A verbatim copy of the pre-change hot path (commit ea1d7ab), so equivalence is checked on any
# machine: forward, twist, resample (gathering the log-probs), then propagate. One intended change
# since: tokens (committed ones, ranked candidates, RewardTilt's x0 samples) are drawn with
# ``inverse_cdf`` (one uniform per position) instead of Gumbel-max (V uniforms each).

_TINY = torch.finfo(torch.float64).tiny


def _ref_rand_at(rows, mask, trailing=()):
    counts = mask.reshape(mask.shape[0], -1).sum(-1).tolist()
    parts = [rows.rand_row(b, (int(c), *trailing), mask.device) for b, c in enumerate(counts)]
    return torch.cat(parts) if parts else mask.new_empty((0, *trailing), dtype=torch.float64)


def _ref_denoiser_log_probs(logits, mask_id, is_log_probs=False):
    logits = logits.clone()
    logits[..., mask_id] = -torch.inf
    return torch.log_softmax(logits, dim=-1)


def _ref_output_log_probs(denoiser, output):
    return _ref_denoiser_log_probs(output, denoiser.mask_id)


class _RefContext(StepContext):
    def rand_at(self, mask, trailing=()):
        grouped = mask.reshape(len(self.rows), -1, *mask.shape[1:])
        return _ref_rand_at(self.rows, grouped, trailing)


class _RefCache:
    def __init__(self, denoiser, enabled=False):
        self.denoiser, self.enabled = denoiser, enabled
        self.x = self.log_probs = None
        self.evaluations = 0

    def __call__(self, x_t, t, cond):
        from lightning_smc.sampling.context import index_rows

        if not self.enabled or self.x is None:
            self.log_probs = _ref_denoiser_log_probs(
                self.denoiser(x_t, t, cond), self.denoiser.mask_id
            )
            self.evaluations += x_t.shape[0]
        else:
            stale = (x_t != self.x).any(-1).nonzero().flatten()
            if len(stale) == x_t.shape[0]:
                self.log_probs = _ref_denoiser_log_probs(
                    self.denoiser(x_t, t, cond), self.denoiser.mask_id
                )
            elif len(stale):
                fresh = self.denoiser(x_t[stale], t[stale], index_rows(cond, stale))
                self.log_probs = self.log_probs.clone()
                self.log_probs[stale] = _ref_denoiser_log_probs(fresh, self.denoiser.mask_id)
            self.evaluations += len(stale)
        self.x = x_t
        return self.log_probs

    def reorder(self, index):
        self.x, self.log_probs = self.x[index], self.log_probs[index]
        return self.log_probs


class _ReferenceSampler(SMCSampler):
    def _run(self, x, plans, cond, rows, record_path=False):
        from lightning_smc.sampling.trace import Trace as _Trace

        B, N, T = len(rows), self.num_particles, len(plans)
        trace = _Trace.empty(B, N, T, x.device)
        log_w = trace.new_weights()
        prev_twist = torch.zeros(B * N, dtype=torch.float64, device=x.device)
        network = _RefCache(self.denoiser, self.cache)
        extra_evals = 0
        for plan in plans:
            k = plan.step
            if self.policy.may_finish_early and not self._block_open(x, plan):
                trace.ess[:, k - 1 :] = ess(log_w).unsqueeze(1)
                continue
            t = torch.full((x.shape[0],), plan.t, device=x.device)
            ctx = _RefContext(x, t, plan, cond, rows, N, self.denoiser.mask_id)
            base_lp = network(x, t, cond)
            extra_evals += self.potential.extra_nfe + getattr(self.proposal, "extra_nfe", 0)
            twist = self.potential.twist(ctx, base_lp)
            if twist is not None:
                log_w += (twist - prev_twist).view(B, N)
                prev_twist = twist
            if k > 0:
                trace.ess[:, k - 1] = ess(log_w)
                chosen = self.strategy(log_w, StepInfo(k, T, plan.opens_block)) & (N > 1)
                if chosen.any():
                    index = self._resample(log_w, chosen, rows, trace, k - 1)
                    x, prev_twist, base_lp = x[index], prev_twist[index], network.reorder(index)
                    ctx.x_t = x
            x, increment = self._propagate(ctx, base_lp)
            log_w += increment.view(B, N)
        final = self.potential.final_twist(x)
        if final is not None:
            log_w += (final - prev_twist).view(B, N)
        nfe = network.evaluations / (B * N) + extra_evals
        return trace.finish(x.view(B, N, -1), log_w, nfe)

    def _propagate(self, ctx, base_lp):
        x, plan = ctx.x_t, ctx.plan
        offset = self.potential.offset(ctx)
        q_lp, correct = self._proposal_log_probs(ctx, base_lp, offset)
        log_q = (
            q_lp
            if (self.temperature == 1.0 and self.top_p == 1.0)
            else proposal_log_probs(q_lp, self.temperature, self.top_p)
        )
        in_block = torch.zeros_like(x, dtype=torch.bool)
        in_block[:, plan.block_start : plan.block_end] = True
        masked = in_block & (x == ctx.mask_id)
        V = base_lp.shape[-1]
        if self.policy.value_independent:
            u = ctx.rows.rand((self.num_particles, x.shape[1]), x.device).view_as(x)
            commit = self.policy.select(masked, plan, u=u)
            tokens = inverse_cdf(log_q[commit].exp(), ctx.rand_at(commit))
        else:
            candidates = x.clone()
            candidates[masked] = inverse_cdf(log_q[masked].exp(), ctx.rand_at(masked))
            confidence = (
                q_lp.gather(-1, candidates.clamp_max(V - 1).unsqueeze(-1)).squeeze(-1).exp()
            )
            commit = self.policy.select(masked, plan, confidence=confidence)
            tokens = candidates[commit]
        x_s = x.clone()
        x_s[commit] = tokens
        at = tokens.unsqueeze(-1)
        lp = base_lp[commit].gather(-1, at).squeeze(-1).to(torch.float64)
        target = self.potential.exponent * lp
        if offset is not None:
            target = target + offset[commit].gather(-1, at).squeeze(-1).to(torch.float64)
        reference = log_q[commit].gather(-1, at).squeeze(-1).to(torch.float64) if correct else lp
        increment = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        increment.index_add_(0, commit.nonzero()[:, 0], target - reference)
        return x_s, increment


# Where only the drawn rows of raw logits are normalized (``_normalizes_rows_only``), their
# log-probabilities are ``log(softmax)`` of those rows, the reference's ``log_softmax`` of the
# whole tensor: equal up to float32 rounding (~1e-7 per token, relative), summed in float64
# over at most a few dozen tokens. Integers stay exact; a wrong weight is off by far more.
ROUNDING = dict(rtol=1e-5, atol=1e-5)


def _assert_same(a: ls.SMCOutput, b: ls.SMCOutput, exact: bool = True) -> None:
    for field in ("tokens", "log_weights", "log_normalizer", "ess", "resampled", "ancestors"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        if not exact and x.is_floating_point():
            torch.testing.assert_close(x, y, **ROUNDING, msg=field)
            continue
        # equal_nan: -inf / nan entries must sit at the same places with the same bits
        assert torch.equal(x, y) or (
            x.is_floating_point() and torch.equal(x.view(torch.int64), y.view(torch.int64))
        ), field
    assert torch.equal(a.overtakes, b.overtakes)
    assert a.nfe == b.nfe


def _rows_only(name) -> bool:
    denoiser, kwargs, _ = _config(name)
    return SMCSampler(denoiser, **kwargs)._normalizes_rows_only()


def _reference_run(name, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(potentials_module, "output_log_probs", _ref_output_log_probs)
        m.setattr(proposals_module, "output_log_probs", _ref_output_log_probs)
        return run_config(name, _ReferenceSampler)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_matches_reference_loop(name, monkeypatch):
    _assert_same(run_config(name), _reference_run(name, monkeypatch), exact=not _rows_only(name))


@pytest.mark.parametrize(
    "name", ["tiny-lowconf-selfreward", "tiny-tilt-M2", "tiny-cache-ancestral"]
)
def test_matches_reference_loop_single_thread(name, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _assert_same(
            run_config(name), _reference_run(name, monkeypatch), exact=not _rows_only(name)
        )
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("trailing", [(), (7,), (2, 3)])
def test_rand_at_matches_reference_draws_and_streams(trailing):
    mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[1] = False  # a prompt with nothing to draw

    def rows():
        return RowGenerators.from_seeds([4, 5, 6])

    new_rows, ref_rows = rows(), rows()
    assert torch.equal(rand_at(new_rows, mask, trailing), _ref_rand_at(ref_rows, mask, trailing))
    for a, b in zip(new_rows.generators, ref_rows.generators, strict=True):  # same state after
        assert torch.equal(a.get_state(), b.get_state())
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert rand_at(rows(), empty, trailing).shape == (0, *trailing)


def test_denoiser_log_probs_matches_reference():
    from lightning_smc.sampling.context import denoiser_log_probs

    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    kept = logits.clone()
    assert torch.equal(denoiser_log_probs(logits, 5), _ref_denoiser_log_probs(logits, 5))
    assert torch.equal(logits, kept)  # the caller's logits are never modified
    logits[..., 5] = -torch.inf
    kept = logits.clone()
    assert torch.equal(denoiser_log_probs(logits, 5), _ref_denoiser_log_probs(logits, 5))
    assert torch.equal(logits, kept)


def test_denoiser_log_probs_into_a_buffer_and_unnormalized():
    from lightning_smc.sampling.context import denoiser_log_probs

    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    logits[..., 5] = -torch.inf
    buffer = torch.full_like(logits, 7.0)
    out = denoiser_log_probs(logits, 5, out=buffer)
    assert out is buffer and torch.equal(out, _ref_denoiser_log_probs(logits, 5))
    assert denoiser_log_probs(logits, 5, normalize=False) is logits  # mask already removed
    live = torch.randn(2, 3, 6)
    removed = denoiser_log_probs(live, 5, normalize=False)
    assert torch.isneginf(removed[..., 5]).all() and torch.equal(removed[..., :5], live[..., :5])


ROWS_ONLY = {  # does a step read log p only where it draws? (then only those rows are normalized)
    "tiny-ancestral-plain": True,
    "tiny-ancestral-selfreward-N4": True,
    "tiny-lowconf-selfreward": True,
    "tiny-threshold-blocks": True,
    "tiny-cache-ancestral": True,
    "tiny-tilt-M2": False,  # the twist reads the whole tensor
    "tiny-product": False,  # offset and a normalized mixture
    "tiny-proposal-random": False,  # log q of another denoiser
    "tiny-temp-topp-lowconf": False,  # tempered, top-p
}


@pytest.mark.parametrize("name", sorted(ROWS_ONLY))
def test_rows_only_normalization_is_chosen_when_exact(name, monkeypatch):
    """Where a step reads log p only at drawn rows, the full [R, L, V] log_softmax is skipped
    (the integer outputs stay identical to the reference loop, which normalizes everything;
    the weights equal it up to float32 rounding)."""
    import lightning_smc.sampling.cache as cache_module

    denoiser, kwargs, _ = _config(name)
    assert SMCSampler(denoiser, **kwargs)._normalizes_rows_only() is ROWS_ONLY[name]
    full = []
    real = cache_module.denoiser_log_probs

    def spy(logits, mask_id, is_log_probs=False, *, normalize=True, out=None):
        full.append(normalize)
        return real(logits, mask_id, is_log_probs, normalize=normalize, out=out)

    monkeypatch.setattr(cache_module, "denoiser_log_probs", spy)
    current = run_config(name)
    assert full and all(n is not ROWS_ONLY[name] for n in full)
    monkeypatch.undo()
    _assert_same(current, _reference_run(name, monkeypatch), exact=not ROWS_ONLY[name])


def test_rows_only_is_off_for_log_prob_denoisers_and_custom_twists():
    from lightning_smc.models.mdlm import MDLMDenoiser

    mdlm = MDLMDenoiser(
        vocab_size=10, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2
    )
    assert not SMCSampler(mdlm, num_particles=2, num_steps=4)._normalizes_rows_only()

    class ReadsLogProbs(ls.SelfReward):
        def twist(self, ctx, base_log_probs):
            return base_log_probs.logsumexp(-1).sum(-1).double()

    sampler = SMCSampler(tiny(), num_particles=2, num_steps=4, potential=ReadsLogProbs())
    assert not sampler._normalizes_rows_only()
    assert SMCSampler(tiny(), num_particles=2, num_steps=4)._normalizes_rows_only()


if __name__ == "__main__":
    # python tests/test_sampler_equivalence.py [--write]: the current values (any machine)
    torch.set_num_threads(2)  # as tests/conftest.py
    golden = {name: record(run_config(name)) for name in CONFIG_NAMES}
    lines = [f"  {json.dumps(name)}: {json.dumps(values)}" for name, values in golden.items()]
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    if "--write" in sys.argv:
        GOLDEN_FILE.parent.mkdir(exist_ok=True)
        GOLDEN_FILE.write_text(text)
        print(f"wrote {GOLDEN_FILE}")
    else:
        print(text, end="")
