"""Accuracy vs particles on the embedded reasoning task: the plain sampler vs SR-SMC.

The model is ``lightning_smc/assets/llada_arith_tiny`` (a tiny LLaDA-architecture model trained
by ``configs/pretrain/llada_arith_tiny.yaml``); the problems are the task's fixed test set
(``ArithmeticDataModule.test_problems``, never seen in training; the task's settings are read
from the config's ``data`` section). Each prompt is the left-padded problem (as in training);
the sampler fills ``gen_length`` tokens by semi-autoregressive blocks with ``low_confidence``
(or ``threshold``) unmasking. Methods:

- ``plain``: one particle, ``T`` steps;
- ``SR-SMC N`` (``SelfReward(beta=1)``, ESS < N/2 resampling), ``N`` in ``--particles``:
  *equal steps* (``T`` steps, ``N * T`` evaluations per answer) and *equal NFE*
  (``match_budget(method, T)``: ``T / N`` steps, the plain sampler's ``T`` evaluations).

The answer is the particle the method's ``select`` rule picks (default: the highest
whole-trajectory log-confidence, as SR-SMC's code); it is correct when its text up to the
first EOS holds GSM8K's strict answer line ``#### n`` with ``n`` the true answer
(``extract_gsm8k(text, "strict")``).
Accuracy ``p`` over ``n`` problems is reported with its binomial standard error
``sqrt(p (1 - p) / n)``; NFE is network evaluations per answer (all particles), seconds are wall
time per answer on this machine. Seeds: prompt ``i`` uses ``derive_seed(seed, i)`` for every
method, so results do not depend on batching::

    OMP_NUM_THREADS=1 python experiments/reasoning_table.py --num-problems 256
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

from lightning_smc.data.arithmetic import ArithmeticDataModule, Problem
from lightning_smc.evaluation.reasoning import extract_gsm8k
from lightning_smc.methods.method import Method, answers, build_sampler, match_budget
from lightning_smc.methods.specs import SelfRewardSpec
from lightning_smc.models.llada import LLaDADenoiser
from lightning_smc.models.tokenizer import load_tokenizer
from lightning_smc.smc import derive_seed

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "lightning_smc/assets/llada_arith_tiny"
CONFIG = ROOT / "configs/pretrain/llada_arith_tiny.yaml"
OUT = ROOT / "experiments/results/reasoning_table"


def task_module(config: Path) -> ArithmeticDataModule:
    """The data module of the training config (its task settings define the test set)."""
    node = yaml.safe_load(config.read_text())["data"]
    if not str(node.get("class_path", "")).endswith("ArithmeticDataModule"):
        raise ValueError(f"{config}: data is not an ArithmeticDataModule")
    return ArithmeticDataModule(**(node.get("init_args") or {}))


def methods(args: argparse.Namespace) -> list[tuple[str, Method]]:
    """``(setting, method)``: the plain sampler, then SR-SMC at equal steps and equal NFE."""
    common = {
        "unmasking": args.unmasking,
        "block_length": args.block_length,
        "confidence_threshold": args.threshold,
        "temperature": args.temperature,
    }
    out = [("baseline", Method(name="plain N=1", num_steps=args.steps, **common))]
    for n in args.particles:
        smc = Method(
            name=f"SR-SMC N={n}",
            num_particles=n,
            num_steps=args.steps,
            potential=SelfRewardSpec(beta=args.beta),
            select=args.select,
            **common,
        )
        out.append(("equal steps", smc))
        if n > 1:
            out.append(("equal NFE", match_budget(smc, args.steps)))
    return out


def evaluate(
    method: Method,
    denoiser: LLaDADenoiser,
    dm: ArithmeticDataModule,
    problems: list[Problem],
    seed: int,
    batch_rows: int,
) -> dict:
    """Accuracy (strict ``#### n``), its standard error, NFE and seconds per answer."""
    sampler = build_sampler(method, denoiser)
    prompts = torch.stack([dm.prompt_ids(p) for p in problems])
    per_batch = max(1, batch_rows // method.num_particles)
    correct, nfe, texts, start = [], 0.0, [], time.perf_counter()
    for lo in range(0, len(problems), per_batch):
        hi = min(lo + per_batch, len(problems))
        gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in range(lo, hi)]
        out = sampler.sample(seq_len=dm.seq_len, prompt=prompts[lo:hi], generator=gens)
        nfe += float(out.nfe) * method.num_particles * (hi - lo)
        for problem, ids in zip(problems[lo:hi], answers(out, method), strict=True):
            text = response_text(dm, ids[dm.prompt_length :])
            texts.append(text)
            correct.append(extract_gsm8k(text, "strict") == str(problem.answer_value))
    seconds = time.perf_counter() - start
    n, p = len(correct), sum(correct) / len(correct)
    return {
        "accuracy": p,
        "se": math.sqrt(p * (1 - p) / n),
        "n": n,
        "nfe_per_answer": nfe / n,
        "seconds_per_answer": seconds / n,
        "num_steps": method.num_steps,
        "examples": texts[:3],
    }


def response_text(dm: ArithmeticDataModule, ids: torch.Tensor) -> str:
    """The generated text up to the first EOS."""
    ids = ids.tolist()
    if dm.eos_id in ids:
        ids = ids[: ids.index(dm.eos_id)]
    return dm.tokenizer.decode(ids, skip_special_tokens=True)


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        "# Embedded reasoning table: plain sampler vs SR-SMC (arithmetic word problems)",
        "",
        f"Command: `{settings['command']}`",
        "",
        f"Model `{settings['model']}`; {settings['num_problems']} fixed test problems (never in "
        f"training); `{settings['unmasking']}` unmasking, block length {settings['block_length']}"
        f", {settings['gen_length']} generated tokens, temperature {settings['temperature']}; "
        f"SR-SMC: SelfReward(beta={settings['beta']}), ESS < N/2 resampling, answer rule "
        f"`select: {settings['select']}`. Accuracy: strict `#### n` match, ± binomial SE. "
        "NFE: network evaluations per answer (all particles). Seconds: wall time per answer, "
        f"{settings['machine']}.",
        "",
        "| method | setting | steps | NFE / answer | accuracy | ± SE | s / answer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['num_steps']} | {r['nfe_per_answer']:.0f} "
            f"| {100 * r['accuracy']:.1f}% | {100 * r['se']:.1f} | {r['seconds_per_answer']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--config", type=Path, default=CONFIG, help="its data section: the task")
    parser.add_argument("--num-problems", type=int, default=256)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--steps", type=int, default=24, help="T of the plain sampler (a multiple of the blocks)"
    )
    parser.add_argument(
        "--unmasking", choices=["low_confidence", "threshold"], default="low_confidence"
    )
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument(
        "--select",
        choices=["confidence", "weight"],
        default="confidence",
        help="SR-SMC's answer rule: the highest whole-trajectory log-confidence (the paper's "
        "code) or the highest weight",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-rows", type=int, default=256, help="particle rows per call")
    parser.add_argument("--out", type=Path, default=OUT, help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.num_problems < 1 or any(n < 1 for n in args.particles) or args.steps < 1:
        parser.error("--num-problems, --particles and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with torch.no_grad():  # not set_grad_enabled(False): callers (tests) keep their grad mode
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> list[dict]:
    dm = task_module(args.config)
    denoiser = LLaDADenoiser.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model).tokenizer
    if tokenizer.get_vocab() != dm.tokenizer.get_vocab():
        raise ValueError(f"{args.model}: its tokenizer is not the arithmetic task's")
    if args.num_problems > dm.num_test:
        raise ValueError(
            f"--num-problems {args.num_problems} > the task's {dm.num_test} test problems"
        )
    problems = dm.test_problems[: args.num_problems]
    rows = []
    for setting, method in methods(args):
        result = evaluate(method, denoiser, dm, problems, args.seed, args.batch_rows)
        rows.append({"method": method.name, "setting": setting, **result})
        print(
            f"{method.name:>12} {setting:>11} T={method.num_steps:<3} "
            f"acc {100 * result['accuracy']:.1f} ± {100 * result['se']:.1f}  "
            f"NFE {result['nfe_per_answer']:.0f}  {result['seconds_per_answer']:.3f} s",
            flush=True,
        )
    settings = {
        "command": "OMP_NUM_THREADS=1 python experiments/reasoning_table.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": str(
            args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
        ),
        "num_problems": len(problems),
        "gen_length": dm.gen_length,
        "machine": f"CPU, {torch.get_num_threads()} thread(s)",
        **{k: v for k, v in vars(args).items() if k not in ("model", "config", "out")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text(markdown(rows, settings))
    return rows


if __name__ == "__main__":
    main()
