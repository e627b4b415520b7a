"""The SR-SMC paper's reasoning table for one diffusion LLM: 4 tasks x {plain, SR-SMC}.

Runs ``configs/methods/dllm/<model>_{plain,srsmc}.yaml`` (256 tokens in blocks of 32, Fast-dLLM
threshold 0.9 with the prefix KV cache, bf16; SR-SMC with N = 4, SelfReward, resampling at block
ends when ESS < N/2, the answer by whole-trajectory confidence) on GSM8K (5-shot), MATH-500
(4-shot), HumanEval (0-shot) and MBPP (3-shot) through ``python -m lightning_smc.sample``, and
writes ``<out>/<model>_table.md``: accuracy +- SE (binomial, over the problems) of each cell next
to the paper's number (Luo et al., arXiv 2602.01849, Table 1; LLaDA-8B-Instruct has none there),
plus NFE per answer and tokens/s; ``<out>/<model>_table.json`` holds every summary and each run
keeps its ``samples.jsonl`` under ``<out>/<model>/<task>/<method>/``. On one H200 the full
table is hours per model (N = 4 decodes 4x the tokens); ``--limit`` takes the first problems.

    python experiments/reasoning_paper_table.py --model llada_1.5 --weights checkpoints/LLaDA-1.5
    python experiments/reasoning_paper_table.py --model dream_instruct --limit 200 --tasks gsm8k

Anything after ``--`` goes to every run (e.g. ``-- --method.kv_cache dual --batch_size 16``).
Under ``torchrun --nproc_per_node 8 experiments/reasoning_paper_table.py ...`` every run splits
its problems over the processes (one process group for all runs; rank zero writes the tables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    from lightning_smc import dist
    from lightning_smc.sample import main as sample
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(ROOT))
    from lightning_smc import dist
    from lightning_smc.sample import main as sample

MODELS = ("llada_instruct", "llada_1.5", "dream_instruct")
TASKS = ("gsm8k", "math500", "humaneval", "mbpp")
TASK_NAMES = {"gsm8k": "GSM8K", "math500": "MATH", "humaneval": "HumanEval", "mbpp": "MBPP"}
METHODS = {"plain": "plain", "srsmc": "SR-SMC"}
#: Table 1 of the SR-SMC paper (accuracy %, plain / SR-SMC)
PAPER = {
    "llada_1.5": {
        "gsm8k": (79.8, 80.7),
        "math500": (38.2, 41.8),
        "humaneval": (38.7, 41.5),
        "mbpp": (40.4, 44.2),
    },
    "dream_instruct": {
        "gsm8k": (76.2, 78.0),
        "math500": (41.6, 45.2),
        "humaneval": (47.9, 53.7),
        "mbpp": (42.0, 48.6),
    },
}


def run_table(model, tasks, out, weights=None, limit=None, device=None, extra=()) -> dict:
    """Every (task, method) run: ``{task: {method: summary}}`` (also written to ``out``)."""
    out = Path(out)
    results: dict[str, dict[str, dict]] = {}
    for task in tasks:
        results[task] = {}
        for method in METHODS:
            config = ROOT / "configs/methods/dllm" / f"{model}_{method}.yaml"
            argv = [
                "--config",
                str(config),
                "--task",
                task,
                "--out",
                str(out / model / task / method),
            ]
            if weights is not None:
                argv += ["--model", str(weights)]
            if limit is not None:
                argv += ["--limit", str(limit)]
            if device is not None:
                argv += ["--device", device]
            (summary,) = sample([*argv, *extra]).values()
            results[task][method] = summary
    if dist.is_rank_zero():
        (out / f"{model}_table.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / f"{model}_table.md").write_text(markdown(model, results))
    return results


def markdown(model: str, results: dict) -> str:
    """The table: one row per task, accuracy +- SE (%) of each method beside the paper's."""
    paper = PAPER.get(model, {})
    lines = [
        f"# {model}: plain vs SR-SMC (accuracy %, +- 1 SE over the problems)",
        "",
        "| task | n | plain | paper | SR-SMC | paper | NFE/answer plain / SR-SMC | tokens/s plain / SR-SMC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, cells in results.items():
        ours = [cells[m] for m in METHODS]
        ref = paper.get(task, (None, None))
        row = [TASK_NAMES[task], str(ours[0]["num_items"])]
        for summary, number in zip(ours, ref, strict=True):
            row += [
                f"{100 * summary['accuracy']:.1f} +- {100 * summary['accuracy_se']:.1f}",
                "-" if number is None else f"{number:.1f}",
            ]
        row.append(" / ".join(f"{s['nfe'] * s['particles']:.0f}" for s in ours))
        row.append(" / ".join(f"{s['tokens_per_s']:.1f}" for s in ours))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Settings: configs/methods/dllm/ (256 tokens, blocks of 32, threshold 0.9, prefix KV "
        "cache, bf16; SR-SMC N = 4, block:0.5, select confidence). Paper: Luo et al., arXiv "
        "2602.01849, Table 1.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True, help="the configs' model")
    parser.add_argument("--weights", help="the model folder (default: the configs' checkpoints/)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--limit", type=int, help="the first LIMIT problems of each task")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: the configs' (cuda)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/reasoning_paper")
    args = parser.parse_args(argv)
    # under torchrun: one process group for every run (each ``sample`` run reuses it; creating
    # and destroying one per run can pick up stale gloo / NCCL addresses)
    with dist.process_group(args.device or "cuda"):
        results = run_table(
            args.model, args.tasks, args.out, args.weights, args.limit, args.device, extra
        )
        if dist.is_rank_zero():
            print((args.out / f"{args.model}_table.md").read_text())
    return results


if __name__ == "__main__":
    main()
