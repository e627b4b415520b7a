"""Issue 4's expected result: reward-guided SMC methods on the embedded model, one table.

Runs the embedded method configs (configs/methods/embedded/*.yaml) at the same N, steps, seeds
and prompts — base sampler (N=1), best-of-N, SMCbase, SMCgrad, SMCamot — and reports the
steering reward (VADER), success rate (VADER > 0.05), the holdout reward (AFINN), generative
perplexity under SmolLM2-135M (token-weighted over all answers) and seconds per sample.

    python experiments/reward_smc_table.py --num-samples 64 --particles 8 --out results.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_smc.evaluation import run_config
from lightning_smc.methods import load_method_config
from lightning_smc.metrics import GenerativePerplexity

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["best_of_n", "smc_base", "smc_grad", "smc_amot"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: each config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    common = ["--num_samples", str(args.num_samples), "--seed", str(args.seed)]
    if args.steps is not None:
        common += ["--method.num_steps", str(args.steps)]
    runs = [
        (
            "base sampler (N=1)",
            "best_of_n",
            ["--method.num_particles", "1", "--method.name", "base"],
        )
    ]
    runs += [(None, name, ["--method.num_particles", str(args.particles)]) for name in METHODS]
    rows = []
    for label, name, extra in runs:
        run = load_method_config(ROOT / f"configs/methods/embedded/{name}.yaml", common + extra)
        start = time.perf_counter()
        result = run_config(run, progress_bar=True)
        ppl = GenerativePerplexity()
        ppl.update(result.texts)
        summary = result.summary(run.reward.success_threshold)
        rows.append(
            {
                "method": label or f"{run.method.name} (N={run.method.num_particles})",
                **summary,
                "gen_ppl": float(ppl.compute()),
                "total_s": time.perf_counter() - start,
            }
        )
        print(rows[-1], flush=True)
    keys = ["reward", "success", "holdout", "gen_ppl", "ess", "nfe", "seconds"]
    lines = [
        f"{args.num_samples} samples per method, seq_len {run.seq_len}, seed {args.seed}, "
        f"torch {torch.__version__}",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
