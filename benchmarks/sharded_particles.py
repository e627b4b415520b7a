"""Sharded particles: sampling throughput with 1 and with W processes, and the cost of global
resampling per step (``SMCSampler(..., layout=ParticleShards())``, CPU, gloo).

Workload: SR-SMC (``SelfReward()``, ``low_confidence`` unmasking) with a randomly initialised
``ls.TinyTransformerDenoiser``, ``B`` prompts x ``N`` particles, ``T`` steps, resampling
``--resample-when`` (default ``always``: every step pays for a global resample, the upper bound)
with ``--resampling`` (default ``systematic``; ``multinomial`` moves many more rows).

1. one process, ``layout="local"``: all ``N`` particles;
2. ``W`` processes (spawned, gloo over a ``FileStore``), ``layout=ParticleShards()``: ``N / W``
   particles per rank; a barrier before each run, wall time = the slowest rank.

Each gets one warm-up run and ``--repeats`` timed runs (medians). **Throughput** is ``B * N``
sequences per second of wall time; the **ratio** is ``throughput(W) / throughput(1)`` (``W`` at
best, when each process has its own cores). **Global resampling per step** is the time inside
the sharded layout's ``settle`` (all-gather of the weight increments), the sampler's
``_resample`` (the chosen prompts' global ancestors and ``log Ẑ``) and the layout's ``follow``:
``exchange`` (exchange plan, point-to-point exchange of the moving rows, local gather) and
``re-evaluate`` (the denoiser on the received rows), summed over the run and divided by ``T``,
slowest rank. A barrier before each hook keeps the time a rank spends waiting for a slower one
(load imbalance, shown apart as ``waiting``) out of these figures. The same pieces are timed in
the one-process run for reference (there ``follow`` is a local gather).

    python benchmarks/sharded_particles.py                 # ~30 s on 2 cores
    python benchmarks/sharded_particles.py --quick         # smoke run, ~10 s
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import lightning_smc as ls
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_smc as ls

PIECES = ("all-gather", "ancestors", "exchange", "re-evaluate")


@dataclass
class Sizes:
    vocab_size: int = 1024
    d_model: int = 128
    layers: int = 2
    seq_len: int = 64
    steps: int = 32
    batch: int = 2
    particles: int = 32
    processes: int = 2
    repeats: int = 3
    threads: int = 1
    resample_when: str = "always"
    resampling: str = "systematic"


QUICK = dict(
    vocab_size=64, d_model=32, layers=1, seq_len=16, steps=8, batch=2, particles=8, repeats=1
)


class _Clock:
    """Accumulates seconds per piece (the layout's and sampler's hooks call it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, piece: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[piece] += time.perf_counter() - start


class TimedShards(ls.ParticleShards):
    """Times its hooks; a barrier before each (timed apart as ``wait``) keeps the time one rank
    spends waiting for a slower one out of the communication figures."""

    clock = _Clock()

    def settle(self, log_w):
        if self._pending:
            self.clock.timed("wait", dist.barrier)
        return self.clock.timed("all-gather", super().settle, log_w)

    def follow(self, index, ctx, prev_twist, base_lp, network):
        self.clock.timed("wait", dist.barrier)
        evaluate = network.evaluate
        network.evaluate = lambda *a: self.clock.timed("re-evaluate", evaluate, *a)
        try:
            args = (index, ctx, prev_twist, base_lp, network)
            return self.clock.timed("exchange", super().follow, *args)
        finally:
            del network.evaluate


class TimedLocal(ls.LocalParticles):
    clock = TimedShards.clock

    def follow(self, *args):
        return self.clock.timed("exchange", super().follow, *args)


class TimedSampler(ls.SMCSampler):
    def _resample(self, *args):
        return TimedShards.clock.timed("ancestors", super()._resample, *args)


def _sampler(sizes: Sizes, layout) -> TimedSampler:
    torch.manual_seed(0)  # the same network on every rank
    denoiser = ls.TinyTransformerDenoiser(
        sizes.vocab_size, max_len=sizes.seq_len, d_model=sizes.d_model, n_layers=sizes.layers
    ).eval()
    return TimedSampler(
        denoiser,
        num_particles=sizes.particles,
        num_steps=sizes.steps,
        unmasking="low_confidence",
        potential=ls.SelfReward(),
        resample_when=sizes.resample_when,
        resampling=sizes.resampling,
        layout=layout,
    )


def _runs(sizes: Sizes, layout, barrier=lambda: None) -> list[dict]:
    """One warm-up and ``repeats`` timed runs of this process: wall, pieces, rows, NFE."""
    torch.set_num_threads(sizes.threads)
    sampler, clock, runs = _sampler(sizes, layout), TimedShards.clock, []
    for repeat in range(sizes.repeats + 1):
        clock.seconds.clear()
        barrier()
        start = time.perf_counter()
        out = sampler.sample(
            sizes.seq_len, batch_size=sizes.batch, generator=torch.Generator().manual_seed(repeat)
        )
        wall = time.perf_counter() - start
        clock.seconds["exchange"] -= clock.seconds["re-evaluate"]  # timed inside the exchange
        runs.append(
            dict(
                wall=wall,
                **{p: clock.seconds[p] for p in (*PIECES, "wait")},
                sent=getattr(layout, "rows_sent", 0),
                nfe=out.nfe,
                resamples=int(out.resampled.sum()),
            )
        )
    return runs[1:]


def _rank(rank: int, sizes: Sizes, store: str, results) -> None:
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, sizes.processes), rank=rank, world_size=sizes.processes
    )
    results.put((rank, _runs(sizes, TimedShards(), barrier=dist.barrier)))
    dist.destroy_process_group()


def _sharded(sizes: Sizes) -> list[dict]:
    """Per repeat, the slowest rank's wall and pieces; rows sent summed over ranks."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, sizes, str(Path(tmp) / "store"), results))
            for r in range(sizes.processes)
        ]
        for p in procs:
            p.start()
        per_rank = dict(results.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    merged = []
    for runs in zip(*per_rank.values(), strict=True):
        row = {k: max(r[k] for r in runs) for k in ("wall", *PIECES, "wait", "nfe", "resamples")}
        row["sent"] = sum(r["sent"] for r in runs)
        merged.append(row)
    return merged


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(Sizes()).items():
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="write every repeat and the sizes here")
    args = parser.parse_args(argv)
    values = QUICK if args.quick else {}
    given = {f: getattr(args, f) for f in asdict(Sizes()) if getattr(args, f) is not None}
    sizes = Sizes(**{**values, **given})
    if sizes.particles % sizes.processes:
        parser.error(f"--particles {sizes.particles} must be divisible by --processes")

    single, sharded = _runs(sizes, TimedLocal()), _sharded(sizes)
    one, many = _median(single), _median(sharded)
    sequences = sizes.batch * sizes.particles
    print(
        f"TinyTransformerDenoiser V={sizes.vocab_size} d={sizes.d_model} layers={sizes.layers}; "
        f"SR-SMC B={sizes.batch} N={sizes.particles} L={sizes.seq_len} T={sizes.steps}, "
        f"resample_when={sizes.resample_when} ({sizes.resampling}), {sizes.threads} thread(s) "
        "per process"
    )
    print(f"{'processes':>9} {'particles/rank':>14} {'wall s':>8} {'seq/s':>8} {'NFE':>6}")
    for W, r in ((1, one), (sizes.processes, many)):
        print(
            f"{W:>9} {sizes.particles // W:>14} {r['wall']:>8.3f} {sequences / r['wall']:>8.1f} "
            f"{r['nfe']:>6.2f}"
        )
    ratio = one["wall"] / many["wall"]
    print(f"throughput ratio ({sizes.processes} processes / 1): {ratio:.2f}x")
    for W, r in ((1, one), (sizes.processes, many)):
        ms = {p: 1e3 * r[p] / sizes.steps for p in PIECES}
        print(
            f"global resampling per step ({W} process{'es' if W > 1 else ''}): "
            + " + ".join(f"{p} {ms[p]:.2f}" for p in PIECES)
            + f" = {sum(ms.values()):.2f} ms (+ {1e3 * r['wait'] / sizes.steps:.2f} ms waiting "
            f"for the slowest rank); rows sent/step {r['sent'] / sizes.steps:.2f}"
        )
    report = dict(sizes=asdict(sizes), single=single, sharded=sharded, ratio=ratio)
    report["torch"] = torch.__version__
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
