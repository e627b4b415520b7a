"""Fast-dLLM's prefix / dual KV caches as per-row denoiser state (``models.dllm_cache``).

Tiny random LLaDA / Dream built from the golden checkpoints' configs (float32), SR-SMC with
block decoding and resampling at every step (inside blocks too), ``B = 2`` prompts (one
left-padded) x ``N = 4`` particles. What is checked:

- ``refresh="step"`` (no approximation) gives the uncached run's samples and weights;
- a one-layer model, where the caches are exact, gives the uncached run with Fast-dLLM's
  refresh-per-block caches; with the announcements ignored and no rebuild, it does not;
- with two layers (an approximation: the logits differ) the run equals one driven by a
  stateless reference that recomputes the cache of ``z`` at every call, so the weights are those
  of the cached model's own logits;
- after the run each row's cache equals a recomputation from its own tokens (it followed its
  ancestor), with no row rebuilt; rows given ``-1`` (a sharded exchange) are rebuilt exactly.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_smc as ls
from lightning_smc.models.dllm import attention_mask_of
from lightning_smc.models.dllm_cache import CachedDiffusionLM
from lightning_smc.models.dream import DreamDenoiser, DreamModel
from lightning_smc.models.llada import LLaDADenoiser, LLaDAModelLM

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"
BLOCK, BLOCKS, P = 4, 3, 4  # block length, blocks, prompt length
L = P + BLOCK * BLOCKS


def tiny(name: str, layers: int):
    """A random float32 denoiser with the golden config and ``layers`` layers."""
    model_cls, denoiser_cls = {
        "llada": (LLaDAModelLM, LLaDADenoiser),
        "dream": (DreamModel, DreamDenoiser),
    }[name]
    config = model_cls.config_class.from_pretrained(GOLDENS / name / "checkpoint")
    setattr(config, "n_layers" if name == "llada" else "num_hidden_layers", layers)
    torch.manual_seed(11)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # sharper logits than init_std=0.02: the samples depend on them
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return denoiser_cls(model)


def prompts():
    ids = torch.tensor([[7, 8, 9, 10], [257, 257, 12, 13]])
    return ids, {"attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}


def run(denoiser, seed: int = 0, layout: str = "local"):
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=4,
        num_steps=BLOCK * BLOCKS,
        unmasking="low_confidence",
        block_length=BLOCK,
        potential=ls.SelfReward(),
        resampling="multinomial",
        resample_when="every:1",
        layout=layout,
    )
    ids, cond = prompts()
    return sampler.sample(L, prompt=ids, cond=cond, generator=torch.Generator().manual_seed(seed))


def assert_same_run(a, b):
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_weights, b.log_weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.log_normalizer, b.log_normalizer, rtol=0, atol=1e-5)


def moved_inside_blocks(out) -> bool:
    """Some resample inside a block (not at its first step) picked another particle."""
    steps = [k for k in range(out.ancestors.shape[1]) if (k + 1) % BLOCK and k >= BLOCK]
    identity = torch.arange(out.ancestors.shape[-1])
    return any(bool((out.ancestors[:, k] != identity).any()) for k in steps)


class Reference:
    """The cached model without state: every call builds the cache of ``z`` from scratch (the
    block from the sampler's grid) and recomputes the block against it."""

    def __init__(self, cached: CachedDiffusionLM):
        self.cached = cached
        self.vocab_size, self.mask_id = cached.vocab_size, cached.mask_id

    def __call__(self, x_t, t, cond=None):
        c, mask = self.cached, attention_mask_of(cond, x_t)
        first = int((x_t == self.mask_id).any(0).nonzero()[0])
        b = P + (first - P) // BLOCK * BLOCK
        e = b + BLOCK if c.mode == "dual" else L
        with torch.no_grad():
            c.state = c._build(c.opening_state(x_t, b), mask, b, e)
            return c.denoiser.finish(c._split(x_t, mask))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_cache_refreshed_every_step_equals_uncached(name, mode):
    denoiser = tiny(name, layers=2)
    uncached = run(denoiser)
    cached = run(CachedDiffusionLM(denoiser, mode, BLOCK, refresh="step"))
    assert moved_inside_blocks(uncached)
    assert_same_run(cached, uncached)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_one_layer_caches_are_exact_and_must_follow_the_particles(name, mode):
    denoiser = tiny(name, layers=1)
    uncached = run(denoiser)
    cache = CachedDiffusionLM(denoiser, mode, BLOCK)
    assert_same_run(run(cache), uncached)
    assert moved_inside_blocks(uncached)
    assert cache.rebuilt_rows == 0 and cache.openings == BLOCKS

    forgetful = CachedDiffusionLM(denoiser, mode, BLOCK)
    forgetful.reorder_state = lambda index: None  # never moves its rows
    assert_same_run(run(forgetful), uncached)  # stale rows are found and rebuilt ...
    assert forgetful.rebuilt_rows > 0
    forgetful._rebuild_stale = lambda x_t, mask: None  # ... without that, the run goes wrong
    assert not torch.equal(run(forgetful).log_weights, uncached.log_weights)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_approximate_cache_is_a_well_defined_denoiser(name, mode):
    denoiser = tiny(name, layers=2)
    cache = CachedDiffusionLM(denoiser, mode, BLOCK)
    out = run(cache)
    assert cache.rebuilt_rows == 0
    assert_same_run(out, run(Reference(CachedDiffusionLM(denoiser, mode, BLOCK))))
    # an approximation: inside a block the cached logits are not the model's
    x = out.tokens.flatten(0, 1)[:2].clone()
    x[:, P + BLOCK + 2 :] = denoiser.mask_id  # two tokens into the second block
    ids, cond = prompts()
    with torch.no_grad():
        exact = denoiser(x, None, cond)
        approx = Reference(cache)(x, None, cond)
    block = slice(P + BLOCK + 2, P + 2 * BLOCK)
    assert (exact[:, block, :-10] - approx[:, block, :-10]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_each_row_keeps_the_cache_of_its_ancestor(mode):
    denoiser = tiny("llada", layers=2)
    cache = CachedDiffusionLM(denoiser, mode, BLOCK)
    out = run(cache, seed=3)
    assert moved_inside_blocks(out)
    state, final = cache.state, out.tokens.flatten(0, 1)
    b = P + (BLOCKS - 1) * BLOCK
    assert state.b == b and bool(state.valid.all()) and cache.rebuilt_rows == 0
    _, cond = prompts()
    mask = attention_mask_of(
        {"attention_mask": cond["attention_mask"].repeat_interleave(4, 0)}, final
    )
    with torch.no_grad():
        fresh = cache._build(cache.opening_state(final, b), mask, b, state.e)
    kept = torch.ones(L, dtype=torch.bool)
    kept[b : L if mode == "prefix" else state.e] = False  # recomputed at every call
    for mine, theirs in zip(state.keys + state.values, fresh.keys + fresh.values, strict=True):
        torch.testing.assert_close(mine[:, :, kept], theirs[:, :, kept], rtol=0, atol=1e-6)
    assert torch.equal(state.tokens, fresh.tokens)


def test_rows_from_another_process_are_rebuilt():
    """``reorder_state`` with ``-1`` (rows received in a sharded exchange): the rows are
    rebuilt at the next call, exactly as the cache their sender held."""
    denoiser = tiny("dream", layers=2)
    cache = CachedDiffusionLM(denoiser, "dual", BLOCK)
    torch.manual_seed(0)
    x = torch.randint(0, 250, (4, L))
    x[:, P + BLOCK :] = denoiser.mask_id
    cache(x, torch.ones(4))  # the second block opens
    x[:, P + BLOCK] = torch.randint(0, 250, (4,))
    before = cache(x, torch.full((4,), 0.5))
    index = torch.tensor([2, -1, 0, -1])
    cache.reorder_state(index)
    assert cache.state.valid.tolist() == [True, False, True, False]
    moved = x[index.clamp_min(0)]
    moved[1], moved[3] = x[3], x[1]  # what the other process sent
    after = cache(moved, torch.full((4,), 0.5))
    assert cache.rebuilt_rows == 2
    torch.testing.assert_close(after, before[[2, 3, 0, 1]], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [("prefix", torch.float32), ("dual", torch.float32), ("dual", torch.bfloat16)],
)
def test_calls_inside_a_block_write_one_buffer(mode, dtype):
    """No ``[R, L, V]`` tensor per call (a bf16 model's included: its logits are kept in
    float32): the window is written into the state's buffer (the rows outside it are the
    opening's); a reorder moves the rows into a new buffer, leaving the tensor returned before
    it as it was."""
    denoiser = tiny("llada", layers=2).to(dtype)
    cache = CachedDiffusionLM(denoiser, mode, BLOCK)
    torch.manual_seed(0)
    x = torch.randint(0, 250, (4, L))
    x[:, P + BLOCK :] = denoiser.mask_id
    with torch.no_grad():
        opening = cache(x, torch.ones(4)).clone()
        x[:, P + BLOCK] = torch.randint(0, 250, (4,))
        first = cache(x, torch.full((4,), 0.5))
        kept = first.clone()
        x[:, P + BLOCK + 1] = torch.randint(0, 250, (4,))
        second = cache(x, torch.full((4,), 0.5))
    assert opening.dtype == first.dtype == cache.state.logits.dtype == torch.float32
    storage = cache.state.logits.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr() == storage
    window = slice(P + BLOCK, L if mode == "prefix" else P + 2 * BLOCK)
    outside = torch.ones(L, dtype=torch.bool)
    outside[window] = False
    assert torch.equal(second[:, outside], opening[:, outside])
    assert not torch.equal(first[:, window], kept[:, window])  # valid until the next call only
    before = second.clone()
    cache.reorder_state(torch.tensor([1, 0, 3, 2]))
    with torch.no_grad():
        moved = cache(x[[1, 0, 3, 2]], torch.full((4,), 0.5))
    assert torch.equal(second, before) and cache.rebuilt_rows == 0
    assert moved.untyped_storage().data_ptr() != storage
    torch.testing.assert_close(moved, second[[1, 0, 3, 2]], rtol=0, atol=0)


def test_errors():
    denoiser = tiny("llada", layers=1)
    with pytest.raises(ValueError, match="mode="):
        CachedDiffusionLM(denoiser, "suffix")
    with pytest.raises(ValueError, match="refresh="):
        CachedDiffusionLM(denoiser, refresh="never")
    with pytest.raises(TypeError, match="layers"):
        CachedDiffusionLM(ls.models.dllm.DiffusionLMDenoiser(torch.nn.Identity(), 3, 5))


def test_cache_declares_the_denoisers_end_tokens():
    denoiser = tiny("llada", layers=1)
    cached = CachedDiffusionLM(denoiser, "prefix", BLOCK)
    assert cached.eos_id == denoiser.eos_id == (257,)
    cached.eos_id = (257, 3)  # (e.g. the tokenizer's end-of-turn token appended)
    assert denoiser.eos_id == (257, 3)
    assert ls.SMCSampler(cached, stop_at_eos=True, block_length=BLOCK).eos_ids == (257, 3)


@pytest.mark.timeout(120)
def test_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dllm_cache.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prefix / uncached" in proc.stdout and "dual / uncached" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- two ranks
def _sharded_rank(rank: int, store_path: str, results) -> None:
    """One of two gloo ranks: SR-SMC with sharded particles, cached and reference denoisers."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        summary = {}
        for layers in (1, 2):
            denoiser = tiny("dream", layers)
            cache = CachedDiffusionLM(denoiser, "dual", BLOCK)
            other = (
                denoiser if layers == 1 else Reference(CachedDiffusionLM(denoiser, "dual", BLOCK))
            )
            outs = [run(d, layout="sharded") for d in (cache, other)]
            summary[layers] = dict(
                outs=[(o.tokens, o.log_weights, o.log_normalizer) for o in outs],
                received=cache.received_rows,
                rebuilt=cache.rebuilt_rows,
            )
        buffer = io.BytesIO()  # tensors through a queue would need this process alive
        torch.save(summary, buffer)
        results.put((rank, buffer.getvalue()))
    except Exception as err:  # pragma: no cover - reported by the test
        results.put((rank, repr(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_sharded_exchange_rebuilds_received_rows(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_sharded_rank, args=(r, store, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=150) for _ in procs)
        got = {r: v if isinstance(v, str) else torch.load(io.BytesIO(v)) for r, v in got.items()}
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        assert isinstance(got[rank], dict), got[rank]
        for layers in (1, 2):  # one layer: = uncached; two: = the stateless cached model
            summary = got[rank][layers]
            (tok, lw, lz), (tok_ref, lw_ref, lz_ref) = summary["outs"]
            assert torch.equal(tok, tok_ref)
            torch.testing.assert_close(lw, lw_ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(lz, lz_ref, rtol=0, atol=1e-5)
    assert sum(got[r][2]["received"] for r in (0, 1)) > 0  # rows crossed ranks ...
    assert sum(got[r][2]["rebuilt"] for r in (0, 1)) > 0  # ... and were rebuilt there
