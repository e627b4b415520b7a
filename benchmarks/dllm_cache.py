"""Fast-dLLM KV caches: generated tokens per second without a cache, with the prefix cache and
with the dual cache (``models.dllm_cache.CachedDiffusionLM``), one run each.

Workload: a randomly initialised LLaDA-architecture model (``--d-model``, ``--layers``, a small
vocabulary), a prompt of ``--prompt`` tokens, ``--length`` generated tokens in blocks of
``--block``, SR-SMC (``SelfReward()``) with ``--particles`` particles, ``low_confidence``
unmasking of one token per step (so every variant runs the same ``--length`` steps), resampling
by ESS. **tokens/s** is ``particles * length`` generated tokens per second of wall time after one
warm-up run; the **ratios** ``prefix / uncached`` and ``dual / uncached`` are measured in this
one run (timings on a shared machine vary; nothing is asserted about them). The caches are an
approximation with more than one layer (see ``models.dllm_cache``), so the samples differ.

    python benchmarks/dllm_cache.py             # L = 256, block 32 (~1-2 min on one core)
    python benchmarks/dllm_cache.py --quick     # smoke run, a few seconds
    python benchmarks/dllm_cache.py --device cuda --d-model 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import lightning_smc as ls
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_smc as ls
from lightning_smc.models.dllm_cache import CachedDiffusionLM
from lightning_smc.models.llada import LLaDAConfig, LLaDADenoiser, LLaDAModelLM


def tiny_llada(d_model: int, layers: int, device: str) -> LLaDADenoiser:
    config = LLaDAConfig(
        d_model=d_model,
        n_heads=max(d_model // 32, 1),
        n_kv_heads=max(d_model // 32, 1),
        n_layers=layers,
        mlp_hidden_size=3 * d_model,
        vocab_size=512,
        embedding_size=512,
        mask_token_id=500,
        bos_token_id=501,
        eos_token_id=502,
        pad_token_id=502,
        max_sequence_length=4096,
    )
    torch.manual_seed(0)
    return LLaDADenoiser(LLaDAModelLM(config).float().eval()).to(device)


def tokens_per_second(denoiser, args) -> tuple[float, float]:
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=args.particles,
        num_steps=args.length,
        unmasking="low_confidence",
        block_length=args.block,
        potential=ls.SelfReward(),
    )
    prompt = torch.arange(args.prompt, device=args.device).unsqueeze(0) % 400
    seq_len = args.prompt + args.length

    def once() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        sampler.sample(seq_len, prompt=prompt, generator=torch.Generator().manual_seed(0))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up
    wall = once()
    return args.particles * args.length / wall, wall


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="L = 32, block 8, d_model 64")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.block, args.prompt, args.d_model = 32, 8, 8, 64
    base = tiny_llada(args.d_model, args.layers, args.device)
    variants = {
        "uncached": base,
        "prefix": CachedDiffusionLM(base, "prefix", args.block),
        "dual": CachedDiffusionLM(base, "dual", args.block),
    }
    result = {"settings": {k: str(v) for k, v in vars(args).items()}}
    print(
        f"LLaDA-architecture d_model={args.d_model} layers={args.layers}, L={args.length}, "
        f"block {args.block}, prompt {args.prompt}, N={args.particles}, {args.device}"
    )
    for name, denoiser in variants.items():
        rate, wall = tokens_per_second(denoiser, args)
        result[name] = {"tokens_per_s": rate, "wall_s": wall}
        print(f"  {name:9s} {rate:10.1f} tokens/s  ({wall:.2f} s)")
    for name in ("prefix", "dual"):
        ratio = result[name]["tokens_per_s"] / result["uncached"]["tokens_per_s"]
        result[f"{name}_ratio"] = ratio
        print(f"  {name} / uncached: {ratio:.2f}x (this run)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
