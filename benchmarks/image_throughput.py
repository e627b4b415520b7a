"""Image throughput: VQ encode / decode images/s, and sampling images/s for N = 1, 8, 16 particles.

The model (``--model``) is ``random_tiny_image`` (default: a seeded untrained tiny
class-conditional Meissonic + the Fashion-MNIST VQ configuration, 28 x 28 -> 7 x 7 tokens),
``embedded_image`` or an image model folder (``models.image.load_image_model``). Timings are
medians over ``--repeats`` runs after one warm-up (``torch.cuda.synchronize`` around each on CUDA).

- ``vq encode`` / ``vq decode``: ``--vq-batch`` random images through ``VQTokenizer.encode``,
  their tokens through ``decode``; images/s = batch / time.
- ``sample N=n``: one ``SMCSampler.sample`` call for ``--batch`` class labels with ``n``
  particles each (``--unmasking``, default ``maskgit``, MaskGIT's cosine schedule, ``--steps``;
  ``SelfReward`` SMC when ``n > 1``, the plain sampler when ``n = 1``), then decoding the answers.
  ``particles/s`` counts every particle grid drawn (``batch * n``), ``images/s`` the answers
  (``batch``) including their decode; ``ms/step`` is the wall time per step.

Examples::

    python benchmarks/image_throughput.py --threads 1                   # ~1 min on 2 cores
    python benchmarks/image_throughput.py --model outputs/meissonic_fmnist_tiny/image_model
    python benchmarks/image_throughput.py --quick --json out.json       # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import lightning_smc as ls
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_smc as ls
from lightning_smc.models.image import load_image_model


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up, and its last
    result."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@torch.no_grad()
def bench_vq(model, batch: int, repeats: int, device: torch.device) -> dict[str, dict]:
    vq = model.vq
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, vq.channels, vq.image_size, vq.image_size, generator=g).to(device)
    enc_s, tokens = timed(lambda: vq.encode(images), repeats, device)
    dec_s, _ = timed(lambda: vq.decode(tokens), repeats, device)
    return {
        "vq encode": {"seconds": enc_s, "images_per_s": batch / enc_s},
        "vq decode": {"seconds": dec_s, "images_per_s": batch / dec_s},
    }


@torch.no_grad()
def bench_sampling(model, n: int, args, device: torch.device) -> dict[str, Any]:
    sampler = ls.SMCSampler(
        model.denoiser,
        num_particles=n,
        num_steps=args.steps,
        unmasking=args.unmasking,
        schedule="maskgit_cosine",
        potential=ls.SelfReward() if n > 1 else None,
    )
    labels = (torch.arange(args.batch) % model.num_classes).to(device)

    def run():
        out = sampler.sample(
            model.seq_len,
            batch_size=args.batch,
            cond=labels,
            generator=torch.Generator(device=device).manual_seed(0),
        )
        return out, model.decode(out.best())

    seconds, (out, images) = timed(run, args.repeats, device)
    assert images.shape[0] == args.batch and out.tokens.shape[:2] == (args.batch, n)
    return {
        "seconds": seconds,
        "particles_per_s": args.batch * n / seconds,
        "images_per_s": args.batch / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "nfe": float(out.nfe),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random_tiny_image", help="image model name or folder")
    p.add_argument("--particles", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--batch", type=int, default=8, help="class labels (answers) per call")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--unmasking", default="maskgit")
    p.add_argument("--vq-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.vq_batch, args.repeats = 2, 4, 8, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_image_model(args.model).to(device)
    settings = {
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "grid": list(model.grid_shape),
        "codebook": model.vq.codebook_size,
        "transformer_params": sum(p.numel() for p in model.transformer.parameters()),
        "batch": args.batch,
        "steps": args.steps,
        "unmasking": args.unmasking,
        "vq_batch": args.vq_batch,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    rows = bench_vq(model, args.vq_batch, args.repeats, device)
    print(f"\n{'stage':<12} {'seconds':>9} {'images/s':>10}")
    for name, r in rows.items():
        print(f"{name:<12} {r['seconds']:>9.4f} {r['images_per_s']:>10.1f}")
    sampling = {f"N={n}": bench_sampling(model, n, args, device) for n in args.particles}
    print(
        f"\n{'sample':<8} {'seconds':>9} {'particles/s':>12} {'images/s':>9} {'ms/step':>8} {'NFE':>5}"
    )
    for name, r in sampling.items():
        print(
            f"{name:<8} {r['seconds']:>9.4f} {r['particles_per_s']:>12.1f} "
            f"{r['images_per_s']:>9.2f} {r['ms_per_step']:>8.2f} {r['nfe']:>5.0f}"
        )
    report = {"settings": settings, "vq": rows, "sampling": sampling}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
