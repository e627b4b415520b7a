"""Block decoding as SR-SMC runs it on diffusion LLMs: the whole-trajectory log-confidence that
follows the ancestors (the answer rule ``select: confidence``) and stopping rows at their end
token (``stop_at_eos``)."""

import pytest
import torch

import lightning_smc as ls
from lightning_smc.methods import Method, SelfRewardSpec, answers, build_sampler


def tiny(seed=0, vocab=12, max_len=24):
    torch.manual_seed(seed)
    return ls.TinyTransformerDenoiser(
        vocab_size=vocab, max_len=max_len, d_model=32, n_layers=1
    ).eval()


def committed_log_probs(denoiser, path) -> torch.Tensor:
    """``[S, R]``: per recorded step, the sum of ``log p_theta`` (mask removed, untempered) of
    the tokens each row committed, recomputed from the path with a fresh forward."""
    sums = []
    for k in range(len(path.step)):
        x_from, x_to = path.x_from[k], path.x_to[k]
        t = torch.full((x_from.shape[0],), float(path.t[k]))
        logits = denoiser(x_from, t).double()
        logits[..., denoiser.mask_id] = -torch.inf
        lp = torch.log_softmax(logits, -1).gather(-1, x_to.unsqueeze(-1)).squeeze(-1)
        committed = (x_from == denoiser.mask_id) & (x_to != denoiser.mask_id)
        sums.append(torch.where(committed, lp, torch.zeros_like(lp)).sum(-1))
    return torch.stack(sums)


SETTINGS = {
    "threshold-blocks": dict(unmasking="threshold", confidence_threshold=0.3, block_length=4),
    "low_confidence": dict(unmasking="low_confidence"),
    "tempered-random": dict(unmasking="random", temperature=0.7, block_length=6),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_log_confidence_is_the_sum_over_the_lineage(name):
    B, N, L = 2, 4, 12
    denoiser = tiny(1)
    sampler = ls.SMCSampler(
        denoiser, num_particles=N, num_steps=12, potential=ls.SelfReward(),
        resample_when="always", **SETTINGS[name],
    )  # fmt: skip
    out = sampler.sample(L, B, generator=torch.Generator().manual_seed(3), record_path=True)
    assert out.log_confidence.shape == (B, N) and out.log_confidence.dtype == torch.float64
    c = committed_log_probs(denoiser, out.path)  # [S, B * N]
    steps = out.path.step
    expected = torch.zeros(B, N, dtype=torch.float64)
    naive = torch.zeros(B, N, dtype=torch.float64)  # a sum per slot, ignoring the ancestors
    for j in range(N):
        lineage = out.lineage(torch.full((B,), j))  # [B, T]
        for b in range(B):
            expected[b, j] = sum(c[i, b * N + lineage[b, s]] for i, s in enumerate(steps.tolist()))
            naive[b, j] = c[:, b * N + j].sum()
    assert out.resampled.any()
    torch.testing.assert_close(out.log_confidence, expected, rtol=1e-5, atol=1e-4)
    # the check can fail: a sum that does not follow the ancestors is not the lineage's
    assert (naive - expected).abs().max() > 1e-2
    best = expected.argmax(-1)
    assert torch.equal(out.best_confidence(), out.tokens[torch.arange(B), best])


def test_log_confidence_changes_no_sample_or_weight():
    """Tracking the sum adds no randomness: the same run with a kernel that forgets it gives
    the same tokens, weights and log Ẑ."""
    denoiser = tiny(2)
    kwargs = dict(num_particles=4, num_steps=8, unmasking="low_confidence",
                  potential=ls.SelfReward(), block_length=4)  # fmt: skip
    out = ls.SMCSampler(denoiser, **kwargs).sample(8, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.log_confidence).all() and (out.log_confidence < 0).all()
    # with beta = 1 the move increments are exactly the committed log-probs: between resamples
    # the weights are the log-confidence gained since the last resample
    never = ls.SMCSampler(denoiser, resample_when="never", **kwargs).sample(
        8, 2, generator=torch.Generator().manual_seed(0)
    )
    expected = never.log_confidence - torch.logsumexp(never.log_confidence, -1, keepdim=True)
    torch.testing.assert_close(never.log_weights, expected)


def test_select_confidence_method():
    denoiser = tiny(3)
    method = Method(name="SR-SMC", num_particles=4, num_steps=8, unmasking="low_confidence",
                    block_length=4, potential=SelfRewardSpec(), select="confidence")  # fmt: skip
    out = build_sampler(method, denoiser).sample(8, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(answers(out, method), out.best(out.log_confidence))
    with pytest.raises(ValueError, match="'weight', 'reward' or 'confidence'"):
        Method(select="longest")


# ------------------------------------------------------------------------------ end tokens
class EndingDenoiser(torch.nn.Module):
    """Toy LM (no time conditioning): vocabulary ``0..5``, mask 6, end tokens 4 and 5 (like
    LLaDA's EOS and EoT). A row of a prompt with ``cond = 1`` (all rows without ``cond``) can only
    hold end tokens from position ``end_at`` on; elsewhere only tokens 0-3 are possible."""

    vocab_size, mask_id, eos_id = 7, 6, (4, 5)

    def __init__(self, end_at: int):
        super().__init__()
        self.end_at, self.calls = end_at, 0
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_t, t, cond=None):
        self.calls += 1
        R, L = x_t.shape
        logits = torch.zeros(R, L, self.vocab_size) * self.scale
        logits[..., 4:6] = -torch.inf
        ends = torch.ones(R, dtype=torch.bool) if cond is None else cond.bool()
        tail = ends.view(R, 1) & (torch.arange(L) >= self.end_at).view(1, L)
        logits[tail] = torch.tensor([-torch.inf] * 4 + [0.0, 0.0, -torch.inf])
        logits[..., self.mask_id] = -torch.inf
        return logits


def _run(denoiser, stop, cond=None, B=1, cache=False, **kwargs):
    sampler = ls.SMCSampler(denoiser, num_particles=2, num_steps=16, unmasking="low_confidence",
                            block_length=4, potential=ls.SelfReward(), stop_at_eos=stop,
                            cache=cache, **kwargs)  # fmt: skip
    prompt = torch.zeros(B, 2, dtype=torch.long)
    return sampler.sample(18, prompt=prompt, cond=cond, generator=torch.Generator().manual_seed(0))


def test_stop_at_eos_fills_the_row_and_stops_early():
    off = _run(EndingDenoiser(end_at=6), stop=False)
    assert off.steps == 16 and off.nfe == 16
    on = _run(EndingDenoiser(end_at=6), stop=True)
    # blocks [2, 6) (free tokens) and [6, 10) (all end): 4 steps each, then the row is done
    assert on.steps == 8 and on.nfe == 8
    assert (on.tokens[..., 6:10] >= 4).all() and (on.tokens[..., 10:] == 4).all()  # filled
    assert (on.tokens[..., 2:6] < 4).all()
    assert torch.equal(on.tokens[..., :10], off.tokens[..., :10])
    torch.testing.assert_close(on.log_weights, off.log_weights)  # the fill carries no weight
    assert on.ess.shape == off.ess.shape and torch.isfinite(on.ess).all()


def test_stop_at_eos_only_finished_rows():
    """Prompt 0 ends, prompt 1 never does: no early stop; with the logit cache the finished
    rows are never evaluated again."""
    cond = torch.tensor([1, 0])
    on = _run(EndingDenoiser(end_at=6), stop=True, cond=cond, B=2, cache=True)
    off = _run(EndingDenoiser(end_at=6), stop=False, cond=cond, B=2, cache=True)
    assert on.steps == off.steps == 16
    assert (on.tokens[0, :, 6:] >= 4).all() and (on.tokens[0, :, 10:] == 4).all()
    assert not (on.tokens[1] >= 4).any()
    # prompt 0's rows are evaluated at steps 0-8 only (step 8 sees the fill, then they never
    # change): (9 * 2 + 16 * 2) / 4 rows = 12.5 per sequence; without the stop they keep changing
    assert on.nfe == 12.5 and off.nfe == 16


def test_stop_at_eos_needs_an_end_token():
    denoiser = tiny(0)
    with pytest.raises(ValueError, match="eos_id"):
        ls.SMCSampler(denoiser, stop_at_eos=True)
    assert ls.SMCSampler(denoiser).stop_at_eos is False
    with pytest.raises(TypeError, match="stop_at_eos"):
        ls.SMCSampler(denoiser, stop_at_eos="yes")


def test_sharded_layout_tracks_the_same_log_confidence():
    """The sharded layout's path (increments queued, all-gathered before the sum is read) on
    one rank gives the local layout's log-confidence bit for bit."""
    import torch.distributed as dist

    denoiser = tiny(4)
    kwargs = dict(num_particles=4, num_steps=8, unmasking="low_confidence", block_length=4,
                  potential=ls.SelfReward(), resample_when="always")  # fmt: skip
    local = ls.SMCSampler(denoiser, **kwargs).sample(
        8, 2, generator=torch.Generator().manual_seed(5)
    )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = ls.SMCSampler(denoiser, layout="sharded", **kwargs).sample(
            8, 2, generator=torch.Generator().manual_seed(5)
        )
    finally:
        dist.destroy_process_group()
    assert local.resampled.any()
    assert torch.equal(local.tokens, sharded.tokens)
    assert torch.equal(local.log_confidence, sharded.log_confidence)
