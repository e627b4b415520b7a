"""Prompt-sharded sampling throughput: ``sample`` with 1 and with W processes (torchrun).

Runs ``python -m torch.distributed.run --nproc_per_node=W -m lightning_smc.sample --config C``
for W = 1 and W = ``--processes``, on the same prompts and seeds (the outputs are identical,
which the script checks), with the machine's cores split evenly between the processes
(``OMP_NUM_THREADS = cores // W``). Each configuration is also run with ``--num-samples W`` and
one step, which costs the start-up (interpreter, imports, model loading, process group) and
almost no sampling; ``sampling s = wall - start-up`` and the throughput is
``num_samples / sampling s``. Prints a table and the ratio of the throughputs (W over 1).

    .venv/bin/python benchmarks/distributed_sample.py                 # SR-SMC N=8, 32 prompts
    .venv/bin/python benchmarks/distributed_sample.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an installed package too

from lightning_smc.dist import free_port  # noqa: E402


def run_sample(config: str, processes: int, threads: int, out: Path, *overrides: str) -> float:
    """Wall seconds of one torchrun launch of ``sample`` (raises if it fails)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "lightning_smc.sample",
        "--config",
        config,
        "--metrics",
        "reward,entropy,log_z,nfe",
        "--out",
        str(out),
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return wall


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/methods/embedded/srsmc.yaml")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    sizes = ["--num_samples", str(args.num_samples)]
    if args.quick:
        sizes = ["--num_samples", "4", "--method.num_steps", "4", "--method.num_particles", "2"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for world in (1, args.processes):
            threads = max(args.cores // world, 1)
            out = Path(tmp) / f"w{world}"
            wall = run_sample(args.config, world, threads, out, *sizes)
            startup = run_sample(
                args.config,
                world,
                threads,
                Path(tmp) / f"s{world}",
                "--num_samples",
                str(world),
                "--method.num_steps",
                "1",
            )
            num = int(sizes[1])
            sampling = max(wall - startup, 1e-9)
            rows.append(
                {
                    "processes": world,
                    "threads_each": threads,
                    "wall_s": wall,
                    "startup_s": startup,
                    "sampling_s": sampling,
                    "samples_per_s": num / sampling,
                }
            )
            outputs[world] = (out / "samples.jsonl").read_text()
        identical = outputs[1] == outputs[args.processes]
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"config {args.config} {' '.join(sizes)}; {args.cores} cores")
    print(
        f"{'processes':>9} {'threads':>7} {'wall s':>7} {'start-up s':>10} {'sampling s':>10} {'samples/s':>9}"
    )
    for r in rows:
        print(
            f"{r['processes']:>9} {r['threads_each']:>7} {r['wall_s']:>7.1f} {r['startup_s']:>10.1f}"
            f" {r['sampling_s']:>10.1f} {r['samples_per_s']:>9.2f}"
        )
    print(f"throughput ratio ({args.processes} / 1 processes): {ratio:.2f}")
    print(f"samples.jsonl identical across world sizes: {identical}")
    result = {"rows": rows, "ratio": ratio, "identical": identical, "config": args.config}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not identical:
        raise SystemExit("samples differ between world sizes")
    return result


if __name__ == "__main__":
    main()
