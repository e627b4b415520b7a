"""Block decoding of a diffusion LLM: tokens/s, NFE per answer and the sampler's overhead, without
and with Fast-dLLM's KV caches (``models.dllm_cache.CachedDiffusionLM``), for ``N = 1`` and
``N = 4`` particles under ``low_confidence`` and ``threshold`` decoding.

Workload: a randomly initialised LLaDA-architecture model (``--d-model``, ``--layers``,
``--vocab``), a prompt of ``--prompt`` tokens, ``--length`` generated tokens in blocks of
``--block``; ``N = 1`` is the plain sampler, ``N > 1`` SR-SMC (``SelfReward()``, resampling
``block:0.5``, the answer by whole-trajectory confidence). ``low_confidence`` commits one token
per step (``--length`` steps); ``threshold`` commits every candidate with probability
``>= --threshold`` (at least one), so a block may take fewer steps: a random model is rarely
that confident, a trained one often is.

Figures per (cache, unmasking, N), after one warm-up run, the median of ``--repeats`` runs:

- **tokens/s**: ``N * length`` generated tokens per second of wall time (all particles);
- **NFE/answer**: network evaluations spent on one answer, ``N * out.nfe``;
- **prefix / uncached**, **dual / uncached**: the caches' tokens/s ratios in this run;
- **overhead**: wall time / time inside the network (the denoiser is wrapped in ``Timed``,
  which times every forward and every ``reorder_state`` of the cache, with
  ``torch.cuda.synchronize`` around them on CUDA). 1.00 means the sampler costs nothing
  beyond the network; the target is <= 1.05. On a small CPU model the network is cheap and
  the ratio is high; it is the figure at scale (``--device cuda``, a large ``--vocab``) that
  the target is about.

Where the sampler's time goes (d_model 512, vocab 32k, L = 64, one CPU core,
``benchmarks/README.md``): mostly in drawing the candidates of the block's masked positions
(``sampling.draws.inverse_cdf_at``: gathering their logit rows, one ``softmax``, the inverse
CDF's chunk sums, ``[#masked, V]`` each), the work that defines the samples; with stored logits
about 1.6 ms a step for N = 1 and 6.6 ms for N = 4. That cost does not shrink with the
network, so a shallow cached model (2 layers) shows 1.05-1.07 and 8 layers at most 1.04.
On CPU a fresh ``[R, L, V]`` float32 tensor per network call (over glibc's 32 MB ``mmap`` limit) is unmapped when the sampler drops
it and faulted in again at the next call, several ms a step at that size: the KV cache returns
one reused buffer; for the uncached network an allocator that keeps freed memory
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``, or jemalloc / tcmalloc) removes it, as
CUDA's caching allocator does on a GPU.

The caches are an approximation with more than one layer (see ``models.dllm_cache``), so their
samples differ from the uncached ones; nothing is asserted about timings (shared machines).

    python benchmarks/dllm_cache.py             # L = 256, block 32 (a few minutes on one core)
    python benchmarks/dllm_cache.py --d-model 512 --vocab 32000 --length 64 --repeats 3
    python benchmarks/dllm_cache.py --quick     # smoke run, a few seconds
    python benchmarks/dllm_cache.py --device cuda --d-model 2048 --layers 8 --vocab 126464
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import lightning_smc as ls
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_smc as ls
from lightning_smc.models.dllm_cache import CachedDiffusionLM
from lightning_smc.models.llada import LLaDAConfig, LLaDADenoiser, LLaDAModelLM

CACHES = ("uncached", "prefix", "dual")
UNMASKING = ("low_confidence", "threshold")


def tiny_llada(d_model: int, layers: int, vocab: int, device: str, dtype=torch.float32):
    config = LLaDAConfig(
        d_model=d_model,
        n_heads=max(d_model // 64, 1),
        n_kv_heads=max(d_model // 64, 1),
        n_layers=layers,
        mlp_hidden_size=3 * d_model,
        vocab_size=vocab,
        embedding_size=vocab,
        mask_token_id=vocab - 12,
        bos_token_id=vocab - 11,
        eos_token_id=vocab - 10,
        pad_token_id=vocab - 10,
        max_sequence_length=4096,
    )
    torch.manual_seed(0)
    return LLaDADenoiser(LLaDAModelLM(config).to(dtype).eval()).to(device)


class Timed(torch.nn.Module):
    """An ``ls.Denoiser`` forwarding to ``inner``; ``seconds`` accumulates the time spent in its
    forward and in its ``reorder_state`` (a KV cache moving with the particles)."""

    def __init__(self, inner: Any):
        super().__init__()
        self.inner = inner
        self.vocab_size, self.mask_id = inner.vocab_size, inner.mask_id
        self.seconds, self.calls = 0.0, 0
        self._cuda = next(inner.parameters()).is_cuda
        if callable(getattr(inner, "reorder_state", None)):
            self.reorder_state = self._timed(inner.reorder_state)

    def _timed(self, fn):
        def call(*args):
            if self._cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*args)
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            return result

        return call

    def forward(self, x_t, t, cond=None):
        self.calls += 1
        return self._timed(self.inner)(x_t, t, cond)


def measure(denoiser: Timed, args, unmasking: str, particles: int) -> dict[str, float]:
    smc = particles > 1
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=particles,
        num_steps=args.length,
        unmasking=unmasking,
        block_length=args.block,
        confidence_threshold=args.threshold,
        potential=ls.SelfReward() if smc else None,
        resample_when="block:0.5" if smc else None,
    )
    prompt = torch.arange(args.prompt, device=args.device).unsqueeze(0) % (args.vocab // 2)
    seq_len = args.prompt + args.length

    def once() -> tuple[float, float, Any]:
        denoiser.seconds = 0.0
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sampler.sample(seq_len, prompt=prompt, generator=torch.Generator().manual_seed(0))
        out.best_confidence()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, denoiser.seconds, out

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    wall = statistics.median(r[0] for r in runs)
    network = statistics.median(r[1] for r in runs)
    out = runs[0][2]
    return {
        "tokens_per_s": particles * args.length / wall,
        "nfe_per_answer": particles * out.nfe,
        "steps": out.steps,
        "wall_s": wall,
        "network_s": network,
        "overhead": wall / network,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--quick", action="store_true", help="L = 32, block 8, d_model 64")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.block, args.prompt, args.d_model = 32, 8, 8, 64
    base = tiny_llada(
        args.d_model, args.layers, args.vocab, args.device, getattr(torch, args.dtype)
    )
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    print(
        f"LLaDA-architecture d_model={args.d_model} layers={args.layers} vocab={args.vocab} "
        f"{args.dtype}, L={args.length}, block {args.block}, prompt {args.prompt}, {args.device}"
    )
    print(f"  {'cache':9s} {'unmasking':15s} {'N':>2s} {'tokens/s':>10s} {'NFE/answer':>11s} "
          f"{'steps':>6s} {'overhead':>9s}")  # fmt: skip
    for cache in args.caches:
        inner = base if cache == "uncached" else CachedDiffusionLM(base, cache, args.block)
        for unmasking in UNMASKING:
            for n in args.particles:
                row = measure(Timed(inner), args, unmasking, n)
                result[f"{cache}/{unmasking}/N={n}"] = row
                print(
                    f"  {cache:9s} {unmasking:15s} {n:2d} {row['tokens_per_s']:10.1f} "
                    f"{row['nfe_per_answer']:11.1f} {row['steps']:6d} {row['overhead']:9.3f}"
                )
    if "uncached" in args.caches:  # the caches' speed-ups in this run, per setting
        for name in (c for c in ("prefix", "dual") if c in args.caches):
            for unmasking in UNMASKING:
                for n in args.particles:
                    setting = f"{unmasking}/N={n}"
                    ratio = (
                        result[f"{name}/{setting}"]["tokens_per_s"]
                        / result[f"uncached/{setting}"]["tokens_per_s"]
                    )
                    result[f"{name}_ratio/{setting}"] = ratio
                    print(f"  {name} / uncached: {ratio:.2f}x tokens/s ({setting}, this run)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
