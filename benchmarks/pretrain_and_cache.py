"""Pretraining throughput and the cost of the cached sampler, for the embedded MDLM.

    python benchmarks/pretrain_and_cache.py                       # embedded model (or --checkpoint DIR)
    python benchmarks/pretrain_and_cache.py --quick               # smoke run, a few seconds

1. **Pretraining throughput** (tokens/s): forward + backward + AdamW step of the MDLM ELBO
   (``masked_diffusion_loss``) on batches of ``--batch x --seq-len`` tokens, a model with the
   checkpoint's config, after ``--warmup`` untimed steps.
2. **Sampler cost per step and NFE, with and without the cache**: plain MDLM ancestral sampling
   (``N = 1``) of ``--seq-len`` tokens for several step counts; with ``cache=True`` a sequence is
   re-evaluated only when one of its tokens changed, so NFE < T once T approaches or exceeds L.
   Both runs share the generator, and the table reports whether the samples are identical.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_smc import SMCSampler
from lightning_smc.diffusion import get_schedule
from lightning_smc.models import MDLMConfig, MDLMDenoiser
from lightning_smc.models.loading import EMBEDDED
from lightning_smc.modules import masked_diffusion_loss


def load_model(checkpoint: str | None, quick: bool) -> MDLMDenoiser:
    if quick:
        torch.manual_seed(0)
        return MDLMDenoiser(
            vocab_size=300, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2
        )
    return MDLMDenoiser.from_pretrained(checkpoint or EMBEDDED)


def training_throughput(
    model: MDLMDenoiser, batch: int, seq_len: int, steps: int, warmup: int
) -> float:
    net = MDLMDenoiser(MDLMConfig.from_dict(model.config.to_dict())).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    schedule, g = get_schedule("loglinear"), torch.Generator().manual_seed(0)
    x0 = torch.randint(0, net.mask_id, (batch, seq_len), generator=g)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = masked_diffusion_loss(net, x0, schedule, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * seq_len * steps / (time.perf_counter() - start)


def sampler_costs(
    model: MDLMDenoiser, seq_len: int, step_counts: list[int], batch: int
) -> list[dict]:
    rows = []
    for T in step_counts:
        result = {"steps": T}
        outs = {}
        for cache in (False, True):
            sampler = SMCSampler(model.eval(), num_steps=T, unmasking="ancestral", cache=cache)
            start = time.perf_counter()
            out = sampler.sample(
                seq_len, batch_size=batch, generator=torch.Generator().manual_seed(0)
            )
            wall = time.perf_counter() - start
            key = "cached" if cache else "plain"
            result[f"{key}_ms_per_step"] = 1000 * wall / T
            result[f"{key}_nfe"] = out.nfe
            result[f"{key}_wall_s"] = wall
            outs[key] = out.tokens
        result["identical"] = bool(torch.equal(outs["plain"], outs["cached"]))
        rows.append(result)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch", type=int, default=32, help="training batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.seq_len, args.train_steps, args.warmup, args.steps = 4, 32, 2, 1, [8, 64]
    model = load_model(args.checkpoint, args.quick)
    report = {
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "train_tokens_per_s": training_throughput(
            model, args.batch, args.seq_len, args.train_steps, args.warmup
        ),
        "sampling": sampler_costs(model, args.seq_len, args.steps, args.sample_batch),
    }
    print(f"model: {report['parameters'] / 1e6:.2f}M parameters; threads {report['threads']}")
    print(
        f"pretraining throughput: {report['train_tokens_per_s']:.0f} tokens/s "
        f"(batch {args.batch} x {args.seq_len}, forward + backward + AdamW)"
    )
    print(f"\nancestral sampling, L={args.seq_len}, {args.sample_batch} sequences")
    print(
        f"{'steps':>6} {'ms/step':>9} {'NFE':>7} {'ms/step cached':>15} {'NFE cached':>11} {'identical':>10}"
    )
    for r in report["sampling"]:
        print(
            f"{r['steps']:>6} {r['plain_ms_per_step']:>9.1f} {r['plain_nfe']:>7.1f} "
            f"{r['cached_ms_per_step']:>15.1f} {r['cached_nfe']:>11.1f} {str(r['identical']):>10}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
