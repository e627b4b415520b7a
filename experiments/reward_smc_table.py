"""Paper-style reward table on the embedded model: every method, every cell with a standard error.

Runs the embedded method configs of one task at the same answers, seeds and prompts:

============  ===============================  ==================================================
row           config                           what it is
============  ===============================  ==================================================
base (N=1)    best_of_n.yaml, N=1              the plain sampler
best-of-N     best_of_n.yaml                   N independent samples, the highest reward kept
SMCbase       smc_base.yaml                    reward tilt, base proposal, resampling
SMCgrad       smc_grad.yaml                    + gradient proposal (a learned surrogate's gradient)
SMCamot       smc_amot.yaml                    + amortized LoRA proposal (``--adapter``)
Propgrad      prop_grad.yaml, N=1              the gradient proposal alone
Propamot      prop_amot.yaml, N=1              the amortized proposal alone
============  ===============================  ==================================================

Tasks: ``sentiment`` (configs/methods/embedded: steer VADER, holdout AFINN) and ``toxicity``
(configs/methods/embedded_toxicity: steer ProfanityToxicity towards toxic text, as the paper's
red-teaming table; holdout WordListToxicity; the gradient proposals follow the learned
surrogate lightning_smc/assets/toxicity_reward_tiny; SMCamot / Propamot use the packaged
toxicity adapter lightning_smc/assets/toxicity_adapter_tiny, ``embedded_toxicity``). A task
folder without smc_amot.yaml / prop_amot.yaml runs those rows only with ``--adapter DIR`` (as
SMCbase / Propgrad with the proposal replaced by that adapter).

Budgets (``--budget``): ``equal-steps`` runs every method at its config's steps (``--steps``
overrides); ``equal-nfe`` gives each method the steps that spend what SMCbase spends at those
steps (``N * steps`` denoiser evaluations per answer; ``lightning_smc.methods.match_budget``):
the amortized proposal costs 2 evaluations per particle per step, the gradient proposal 1 plus
one forward and backward pass of the guide, which the NFE does not count (its cost shows in the
seconds column).

Standard errors: means over answers (reward, success, holdout, ESS/N, NFE, seconds) use
``std(ddof=1) / sqrt(n)``; generative perplexity is ``exp(sum NLL / sum tokens)`` over all
answers (token-weighted), its SE the delta method for a ratio of means; Dist-n is pooled over
the answers, its SE the std of 200 bootstrap resamples of the answers (seeded). Seconds are
batch wall times shared equally by the answers of a batch, so their SE is only indicative.

    python experiments/reward_smc_table.py --task toxicity --num-samples 256 --particles 8 \
        --budget both --out experiments/results

writes ``<out>/<task>_table.md`` (the table), ``<out>/<task>_table.json`` (every cell, its SE
and the run's settings) and ``<out>/<task>_samples.jsonl`` (every answer and its scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lightning_smc.evaluation import run_config
from lightning_smc.methods import evaluations_per_step, load_method_config, match_budget
from lightning_smc.metrics.sample_metrics import success_threshold_of
from lightning_smc.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "sentiment": ROOT / "configs/methods/embedded",
    "toxicity": ROOT / "configs/methods/embedded_toxicity",
}
METHODS = ["base", "best_of_n", "smc_base", "smc_grad", "smc_amot", "prop_grad", "prop_amot"]
SINGLE = {"base", "prop_grad", "prop_amot"}  # always one particle
AMORTIZED = {"smc_amot", "prop_amot"}
BUDGETS = ("equal-steps", "equal-nfe")
COLUMNS = [  # (key, header, format)
    ("reward", "reward", ".3f"),
    ("success", "success", ".3f"),
    ("holdout", "holdout", ".3f"),
    ("holdout_success", "holdout success", ".3f"),
    ("gen_ppl", "gen PPL", ".1f"),
    ("dist1", "Dist-1", ".3f"),
    ("dist2", "Dist-2", ".3f"),
    ("dist3", "Dist-3", ".3f"),
    ("ess", "ESS/N", ".3f"),
    ("nfe", "NFE", ".0f"),
    ("seconds", "s / answer", ".3f"),
]


# ---------------------------------------------------------------------- standard errors
def mean_se(values: Any) -> tuple[float, float]:
    """Mean and its standard error ``std(ddof=1) / sqrt(n)`` (``nan`` SE for one value)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_se of no values")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def ratio_se(numerator: Any, denominator: Any) -> tuple[float, float]:
    """``R = sum(a) / sum(b)`` and its delta-method SE over the ``n`` pairs ``(a_i, b_i)``:
    ``SE(R) = sqrt(Var(a - R b) / n) / mean(b)`` with the sample variance (``ddof=1``), i.e.
    ``sqrt(g' S g / n)`` for the gradient ``g = (1 / mean b, -mean a / mean b^2)`` of
    ``mean a / mean b`` and the sample covariance ``S`` of ``(a, b)``."""
    a = np.asarray(numerator, dtype=np.float64).ravel()
    b = np.asarray(denominator, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"ratio_se needs equal, non-empty shapes, got {a.shape} and {b.shape}")
    if b.sum() == 0:
        raise ValueError("ratio_se: the denominator sums to 0")
    ratio = float(a.sum() / b.sum())
    if a.size < 2:
        return ratio, float("nan")
    residual = a - ratio * b
    return ratio, float(math.sqrt(residual.var(ddof=1) / a.size) / b.mean())


def gen_ppl_se(nll: Any, counts: Any) -> tuple[float, float]:
    """Token-weighted perplexity ``exp(sum nll / sum counts)`` and its delta-method SE
    (``PPL * SE(log PPL)``; texts with no scored token are left out)."""
    nll, counts = np.asarray(nll, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    log_ppl, se = ratio_se(nll[keep], counts[keep])
    ppl = math.exp(log_ppl)
    return ppl, ppl * se


def sample_ngrams(texts: list[str], n: int) -> list[list[tuple[str, ...]]]:
    """The whitespace-word n-grams of each text (as ``lightning_smc.metrics.distinct_n``)."""
    out = []
    for text in texts:
        words = text.split()
        out.append([tuple(words[i : i + n]) for i in range(len(words) - n + 1)])
    return out


def dist_bootstrap(
    texts: list[str], n: int, resamples: int = 200, seed: int = 0
) -> tuple[float, float]:
    """Dist-n of ``texts`` (distinct / total n-grams, pooled) and the std of its value over
    ``resamples`` bootstrap resamples of the texts (with replacement, ``numpy`` seeded by
    ``seed``; a text drawn twice repeats its n-grams, as in any bootstrap of a pooled ratio)."""
    grams = sample_ngrams(texts, n)
    vocab: dict[tuple[str, ...], int] = {}
    ids = [
        np.array([vocab.setdefault(g, len(vocab)) for g in row], dtype=np.int64) for row in grams
    ]
    total = sum(len(row) for row in ids)
    if total == 0:
        raise ValueError(f"dist_bootstrap: the texts hold no {n}-gram")
    value = len(vocab) / total
    if len(texts) < 2 or resamples < 2:
        return value, float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(texts), size=len(texts))
        joined = np.concatenate([ids[i] for i in pick])
        values.append(np.unique(joined).size / joined.size if joined.size else float("nan"))
    return value, float(np.nanstd(values, ddof=1))


def dist_jackknife(texts: list[str], n: int) -> tuple[float, float]:
    """Dist-n of ``texts`` and its delete-one jackknife SE: leaving text ``i`` out removes its
    ``t_i`` n-grams and the ``u_i`` n-gram types found in no other text, so ``Dist_(i) = (U -
    u_i) / (T - t_i)`` and ``SE = sqrt((k - 1) / k * sum_i (Dist_(i) - mean)^2)``."""
    grams = sample_ngrams(texts, n)
    owners: dict[tuple[str, ...], set[int]] = {}
    for i, row in enumerate(grams):
        for g in row:
            owners.setdefault(g, set()).add(i)
    total = sum(len(row) for row in grams)
    if total == 0:
        raise ValueError(f"dist_jackknife: the texts hold no {n}-gram")
    value = len(owners) / total
    k = len(texts)
    only = np.zeros(k)
    for holders in owners.values():
        if len(holders) == 1:
            only[next(iter(holders))] += 1
    sizes = np.array([len(row) for row in grams], dtype=np.float64)
    if k < 2 or (sizes == total).any():
        return value, float("nan")
    left_out = (len(owners) - only) / (total - sizes)
    return value, float(math.sqrt((k - 1) / k * ((left_out - left_out.mean()) ** 2).sum()))


# ---------------------------------------------------------------------- configs and runs
def config_path(task: str, name: str, adapter: str | None) -> tuple[Path, list[str]]:
    """The config file of ``name`` for ``task`` and the overrides that make it that method."""
    folder = TASKS[task]
    if name == "base":
        return folder / "best_of_n.yaml", ["--method.num_particles", "1", "--method.name", "base"]
    extra: list[str] = []
    if name in AMORTIZED:
        if adapter is not None:
            extra = ["--method.proposal.adapter", adapter]
        if not (folder / f"{name}.yaml").is_file():  # SMCbase / Propgrad with the adapter
            if adapter is None:
                raise ValueError(
                    f"task {task!r} has no packaged adapter: {name} needs --adapter DIR "
                    "(a LoRA adapter folder written by lightning_smc.fit, e.g. "
                    "configs/quickstart.yaml with the task's reward)"
                )
            source = "smc_base" if name == "smc_amot" else "prop_grad"
            proposal = {"class_path": "DenoiserProposalSpec", "init_args": {"adapter": adapter}}
            label = "SMCamot" if name == "smc_amot" else "Propamot"
            return folder / f"{source}.yaml", [
                "--method.proposal", json.dumps(proposal), "--guide", "null",
                "--method.name", label,
            ]  # fmt: skip
    return folder / f"{name}.yaml", extra


#: names ``LearnedReward.from_pretrained`` resolves to packaged folders (not paths)
PACKAGED_REWARDS = ("embedded", "embedded_toxicity")


def guide_override(path: Path, guide: str | None) -> list[str]:
    """``--guide`` pointing at ``guide`` (a learned-reward folder), or at the config's own guide
    folder made absolute (configs name it relative to the repository root)."""
    if guide is None:
        spec = (yaml.safe_load(path.read_text()) or {}).get("guide")
        folder = ((spec or {}).get("init_args") or {}).get("path")
        if folder is None or folder in PACKAGED_REWARDS or Path(folder).is_absolute():
            return []
        guide = str(ROOT / folder)
    spec = {"class_path": "lightning_smc.rewards.PretrainedLearnedReward"}
    return ["--guide", json.dumps({**spec, "init_args": {"path": str(guide)}})]


def load_run(task: str, name: str, args: argparse.Namespace, budget: int | None):
    """The parsed method config of ``name`` (with the command line's sizes), steps matched to
    ``budget`` when given."""
    path, extra = config_path(task, name, args.adapter)
    common = ["--num_samples", str(args.num_samples), "--seed", str(args.seed)]
    for flag, value in (("seq_len", args.seq_len), ("batch_size", args.batch_size)):
        if value is not None:
            common += [f"--{flag}", str(value)]
    if args.steps is not None:
        common += ["--method.num_steps", str(args.steps)]
    particles = 1 if name in SINGLE else args.particles
    common += ["--method.num_particles", str(particles)]
    guide = [] if "--guide" in extra else guide_override(path, args.guide)
    run = load_method_config(path, common + guide + extra)
    if budget is not None:
        run = dataclasses.replace(run, method=match_budget(run.method, budget))
    return run


def nfe_budget(task: str, args: argparse.Namespace) -> int:
    """What SMCbase spends per answer at its (or ``--steps``) steps: ``N * steps * evals``."""
    method = load_run(task, "smc_base", args, None).method
    return method.num_particles * method.num_steps * evaluations_per_step(method)


def answer_records(result, run, gen_ppl: bool) -> list[dict[str, Any]]:
    """One record per answer: its index, text and every per-answer value a cell needs."""
    columns: dict[str, Any] = {"reward": result.reward.double().tolist()}
    threshold = success_threshold_of(run.reward)
    if threshold is not None:
        columns["success"] = (result.reward > threshold).double().tolist()
    if result.holdout is not None:
        columns["holdout"] = result.holdout.double().tolist()
        hold_threshold = success_threshold_of(run.holdout)
        if hold_threshold is not None:
            columns["holdout_success"] = (result.holdout > hold_threshold).double().tolist()
    if gen_ppl:
        from lightning_smc.metrics import GenerativePerplexity

        nll, counts = GenerativePerplexity().score(result.texts)
        columns["nll"], columns["ntok"] = nll.double().tolist(), counts.tolist()
    columns["ess"] = (result.ess_trace.double().mean(-1) / result.num_particles).tolist()
    columns["nfe"] = result.sample_nfe.double().tolist()
    columns["seconds"] = result.sample_seconds.double().tolist()
    columns["index"] = result.index.tolist()
    columns["text"] = list(result.texts)
    return [{k: v[i] for k, v in columns.items()} for i in range(len(result))]


def cells_of(records: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """Every column of one method's answers as ``{key: {"value", "se"}}``."""
    cells: dict[str, tuple[float, float]] = {}
    for key in ("reward", "success", "holdout", "holdout_success"):
        if key in records[0]:
            cells[key] = mean_se([r[key] for r in records])
    if "nll" in records[0]:
        cells["gen_ppl"] = gen_ppl_se([r["nll"] for r in records], [r["ntok"] for r in records])
    texts = [r["text"] for r in records]
    for n in (1, 2, 3):
        cells[f"dist{n}"] = dist_bootstrap(texts, n, resamples, seed)
        cells[f"dist{n}_jackknife"] = dist_jackknife(texts, n)
    for key in ("ess", "nfe", "seconds"):
        cells[key] = mean_se([r[key] for r in records])
    return {k: {"value": v, "se": se} for k, (v, se) in cells.items()}


def label_of(name: str, run) -> str:
    particles = run.method.num_particles
    if name == "base":
        return "base (N=1)"
    if name == "best_of_n":
        return f"best-of-{particles}"
    return f"{run.method.name} (N={particles})"


def same_as_equal_steps(name: str, run, budget: int, budget_name: str) -> dict[str, Any]:
    """The row of a method whose configuration at the NFE budget is its equal-steps one: no
    cells of its own, the report shows the equal-steps row's (``same_as``)."""
    return {
        "method": label_of(name, run), "key": name, "budget": budget_name,
        "nfe_budget": budget, "num_particles": run.method.num_particles,
        "num_steps": run.method.num_steps, "resample_when": run.method.resample_when,
        "alpha": getattr(run.method.potential, "alpha", None), "n": 0,
        "same_as": "equal-steps", "sampling_s": 0.0, "total_s": 0.0,
    }  # fmt: skip


def run_table(task: str, budget_name: str, args, denoiser, tokenizer, samples_file) -> list[dict]:
    budget = nfe_budget(task, args) if budget_name == "equal-nfe" else None
    rows = []
    for name in args.methods:
        if (
            name in AMORTIZED
            and args.adapter is None
            and not (TASKS[task] / f"{name}.yaml").is_file()
        ):
            print(
                f"[{budget_name}] {name}: skipped (task {task!r} needs --adapter DIR)", flush=True
            )
            continue
        run = load_run(task, name, args, budget)
        if budget is not None and run.method == load_run(task, name, args, None).method:
            # already at the budget (e.g. SMCbase defines it): the same configuration, the same
            # seeds and so the same answers as its equal-steps row; not sampled twice
            rows.append(same_as_equal_steps(name, run, budget, budget_name))
            print(f"[{budget_name}] {rows[-1]['method']}: its equal-steps configuration "
                  "(not rerun)", flush=True)  # fmt: skip
            continue
        start = time.perf_counter()
        result = run_config(run, denoiser, tokenizer, shard=args.shard)
        sampled = time.perf_counter() - start
        records = answer_records(result, run, args.gen_ppl)
        cells = cells_of(records, args.bootstrap, args.seed)
        row = {
            "method": label_of(name, run),
            "key": name,
            "budget": budget_name,
            "nfe_budget": budget,
            "num_particles": run.method.num_particles,
            "num_steps": run.method.num_steps,
            "resample_when": run.method.resample_when,
            "alpha": getattr(run.method.potential, "alpha", None),
            "n": len(result),
            "cells": cells,
            "sampling_s": sampled,
            "total_s": time.perf_counter() - start,
        }
        rows.append(row)
        for record in records:
            head = {"budget": budget_name, "key": name, "method": row["method"]}
            samples_file.write(json.dumps({**head, **record}) + "\n")
        brief = {k: round(c["value"], 4) for k, c in cells.items()}
        print(f"[{budget_name}] {row['method']} steps={row['num_steps']} "
              f"{row['total_s']:.1f}s {brief}", flush=True)  # fmt: skip
    return rows


def cell(entry: dict | None, fmt: str) -> str:
    if entry is None:
        return "–"
    value, se = entry["value"], entry["se"]
    se_text = "nan" if se is None or not math.isfinite(se) else format(se, fmt)
    return f"{format(value, fmt)} ± {se_text}"


def dist_cell(cells: dict[str, Any], key: str) -> dict | None:
    """``cells[key]``; for Dist-n its value with the jackknife SE."""
    if key.startswith("dist") and f"{key}_jackknife" in cells:
        return {"value": cells[key]["value"], "se": cells[f"{key}_jackknife"]["se"]}
    return cells.get(key)


def markdown(task: str, tables: dict[str, list[dict]], settings: dict[str, Any]) -> str:
    run = settings
    commands = run["command"] if isinstance(run["command"], list) else [run["command"]]
    lines = [
        f"# {task} on the embedded model: reward-guided SMC methods",
        "",
        *[f"`{c}`" for c in commands],
        "",
        f"- {run['num_samples']} answers per method (prompt-free, seeds `derive_seed({run['seed']}, i)`), "
        f"seq_len {run['seq_len']}, N = {run['particles']} particles (base, Propgrad, Propamot: N=1).",
        f"- reward (steered): {run['reward']}; holdout (never steered on): {run['holdout']}; "
        f"gradient guide: {run['guide']}; adapter: {run['adapter']}.",
        "- success: reward above its threshold; holdout success: holdout above its threshold.",
        "- every cell is `value ± SE`: means over answers `std(ddof=1)/sqrt(n)`; gen PPL "
        "(SmolLM2-135M, token-weighted over all answers) by the delta method for a ratio; "
        + (
            "Dist-n (whitespace words, pooled) by the delete-one jackknife over answers (the "
            f"JSON also holds the std of {run['bootstrap']} bootstrap resamples, numpy seed "
            f"{run['seed']}, which overstates it: a text drawn twice repeats all its n-grams; "
            "see experiments/dist_se_calibration.py)"
            if run.get("dist_se", "jackknife") == "jackknife"
            else f"Dist-n (whitespace words, pooled) by the std of {run['bootstrap']} bootstrap "
            f"resamples of the answers (numpy seed {run['seed']})"
        )
        + "; seconds are batch wall times shared by the answers of a batch (SE indicative only).",
        f"- wall time: {run['wall_s'] / 60:.1f} min on {run['machine']}, torch {run['torch']}"
        + (" (parts run in parallel: the longest part)." if len(commands) > 1 else "."),
        "",
    ]
    for budget_name, rows in tables.items():
        if budget_name == "equal-steps":
            lines.append("## Equal steps (every method at its config's steps)")
        else:
            nfe = rows[0]["nfe_budget"] if rows else None
            lines.append(
                f"## Equal NFE (budget {nfe} denoiser evaluations per answer = SMCbase's at its "
                "steps; `match_budget`: amortized 2 per particle-step, gradient 1 plus an "
                "uncounted guide forward + backward)"
            )
        lines += ["", "| method | steps | " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
        lines.append("|---|---:|" + "---:|" * len(COLUMNS))
        for row in rows:
            jackknife = run.get("dist_se", "jackknife") == "jackknife"
            label, source = row["method"], row.get("cells")
            if row.get("same_as"):  # the identical configuration's row, shown once more
                twin = next((r for r in tables.get(row["same_as"], []) if r["key"] == row["key"]),
                            None)  # fmt: skip
                label += f" (= its {row['same_as']} row: the same configuration)"
                source = twin["cells"] if twin is not None else {}
            cells = [
                cell(dist_cell(source, k) if jackknife else source.get(k), fmt)
                for k, _, fmt in COLUMNS
            ]
            lines.append(f"| {label} | {row['num_steps']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def scorer_name(spec: Any) -> str:
    if spec is None:
        return "none"
    settings = {k: getattr(spec, k) for k in ("scale", "success_threshold") if hasattr(spec, k)}
    return f"{type(spec).__name__}({', '.join(f'{k}={v}' for k, v in settings.items())})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="sentiment")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--budget", choices=[*BUDGETS, "both"], default="equal-steps")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument(
        "--adapter", default=None,
        help="LoRA adapter folder for SMCamot / Propamot (default: the task's packaged one)",
    )  # fmt: skip
    parser.add_argument("--guide", default=None, help="learned-reward folder for the gradient")
    parser.add_argument("--steps", type=int, default=None, help="default: each config's")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the configs'")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the configs'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=200, help="Dist-n bootstrap resamples")
    parser.add_argument(
        "--dist-se", choices=["jackknife", "bootstrap"], default="jackknife",
        help="the Dist-n SE shown in the table (the JSON holds both)",
    )  # fmt: skip
    parser.add_argument("--no-gen-ppl", dest="gen_ppl", action="store_false")
    parser.add_argument("--name", default=None, help="file stem (default: <task>_table)")
    parser.add_argument(
        "--shard", default=None, metavar="I/K",
        help="only the I-th of K contiguous blocks of the answers (join the parts with --merge)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="folder for .md / .json / .jsonl")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="PART.json",
        help="join the tables of runs of disjoint --methods (e.g. run in parallel) into one",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.shard is not None:
        try:
            rank, world = (int(v) for v in args.shard.split("/"))
            assert 0 <= rank < world
        except (ValueError, AssertionError):
            parser.error(f"--shard {args.shard!r}: write I/K with 0 <= I < K")
        args.shard = (rank, world)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    if args.num_samples < 1 or args.particles < 1:
        parser.error("--num-samples and --particles must be >= 1")
    return args


def merge(
    parts: list[Path], out: Path, stem: str, command: str, dist_se: str = "jackknife"
) -> dict[str, Any]:
    """One table from the JSON records of runs of the same task and sizes on disjoint methods
    (their ``_samples.jsonl`` files are joined too)."""
    records = [json.loads(Path(p).read_text()) for p in parts]
    first = records[0]["settings"]
    same = ("task", "num_samples", "particles", "seq_len", "seed", "bootstrap", "gen_ppl")
    for record, path in zip(records, parts, strict=True):
        differ = [k for k in same if record["settings"][k] != first[k]]
        if differ:
            raise ValueError(f"--merge: {path} differs from {parts[0]} in {differ}")
    answers: dict[tuple[str, str], list[dict]] = {}
    for path in parts:
        part_samples = Path(path).with_name(Path(path).stem + "_samples.jsonl")
        if part_samples.is_file():
            for line in part_samples.read_text().splitlines():
                answer = json.loads(line)
                answers.setdefault((answer.get("budget"), answer.get("key")), []).append(answer)
    tables: dict[str, list[dict]] = {}
    for record, path in zip(records, parts, strict=True):
        for budget_name, rows in record["tables"].items():
            for row in rows:
                if record["settings"].get("shard") is None:
                    tables.setdefault(budget_name, []).append(row)
                    continue
                joined = next(
                    (r for r in tables.get(budget_name, []) if r["key"] == row["key"]), None
                )
                if joined is None:  # the first shard of this method
                    tables.setdefault(budget_name, []).append({**row, "shards": [str(path)]})
                else:
                    joined["shards"].append(str(path))
                    joined["sampling_s"] += row["sampling_s"]
                    joined["total_s"] = max(joined["total_s"], row["total_s"])
    for budget_name, rows in tables.items():
        keys = [r["key"] for r in rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--merge: a method appears twice in {budget_name}: {keys}")
        rows.sort(key=lambda r: METHODS.index(r["key"]))
        for row in rows:
            if "shards" not in row or row.get("same_as"):
                continue
            group = sorted(answers.get((budget_name, row["key"]), []), key=lambda a: a["index"])
            indices = [a["index"] for a in group]
            if indices != list(range(first["num_samples"])):
                raise ValueError(
                    f"--merge: the shards of {row['key']} ({budget_name}) hold "
                    f"{len(indices)} answers, not each of 0..{first['num_samples'] - 1} once"
                )
            row["n"] = len(group)
            row["cells"] = cells_of(group, first["bootstrap"], first["seed"])
        budgets = {r["nfe_budget"] for r in rows}
        if len(budgets) > 1:
            raise ValueError(f"--merge: {budget_name} rows were run at budgets {budgets}")
    settings = {**first, "wall_s": max(r["settings"]["wall_s"] for r in records)}
    settings["dist_se"] = dist_se
    settings["part_wall_s"] = [r["settings"]["wall_s"] for r in records]
    commands = [r["settings"]["command"] for r in records]  # a merged part holds a list
    settings["command"] = [c for cs in commands for c in ([cs] if isinstance(cs, str) else cs)]
    settings["command"].append(command)
    for key in ("guide", "adapter"):
        values = [r["settings"][key] for r in records if r["settings"][key] != "none"]
        settings[key] = values[0] if values else "none"
    out.mkdir(parents=True, exist_ok=True)
    texts = []  # read every part before writing: --out may be a part's own folder
    for path in parts:
        part_samples = Path(path).with_name(Path(path).stem + "_samples.jsonl")
        if part_samples.is_file():
            texts.append(part_samples.read_text())
    target = out / f"{stem}_samples.jsonl"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(texts))
    tmp.replace(target)
    return write(out, stem, settings["task"], tables, settings)


def write(out: Path, stem: str, task: str, tables, settings) -> dict[str, Any]:
    text = markdown(task, tables, settings)
    print(text)
    (out / f"{stem}.md").write_text(text + "\n")
    record = {"settings": settings, "tables": tables}
    (out / f"{stem}.json").write_text(json.dumps(finite(record), indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    stem = args.name or f"{args.task}_table"
    out = args.out if args.out is not None else Path("outputs/reward_smc_table")
    command = "python experiments/reward_smc_table.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.merge:
        return merge(args.merge, out, stem, command, args.dist_se)
    start = time.perf_counter()
    probe = load_run(args.task, "best_of_n", args, None)
    denoiser, spec = load_model(probe.model, probe.tokenizer)
    budgets = BUDGETS if args.budget == "both" else (args.budget,)
    out.mkdir(parents=True, exist_ok=True)
    guide_run = next((m for m in ("smc_grad", "prop_grad") if m in args.methods), None)
    guide = load_run(args.task, guide_run, args, None).guide if guide_run else None
    tables = {}
    samples_path = out / f"{stem}_samples.jsonl"
    with open(samples_path, "w") as samples_file:
        for budget_name in budgets:
            tables[budget_name] = run_table(
                args.task, budget_name, args, denoiser, spec.tokenizer, samples_file
            )
    adapter = args.adapter or ("embedded" if args.task == "sentiment" else "embedded_toxicity")
    settings = {
        "command": command,
        "task": args.task,
        "num_samples": args.num_samples,
        "particles": args.particles,
        "seq_len": probe.seq_len,
        "seed": args.seed,
        "bootstrap": args.bootstrap,
        "dist_se": args.dist_se,
        "gen_ppl": args.gen_ppl,
        "reward": scorer_name(probe.reward),
        "holdout": scorer_name(probe.holdout),
        "guide": args.guide or (getattr(guide, "config", None) and guide.config.name) or "none",
        "adapter": adapter,
        "shard": args.shard,
        "wall_s": time.perf_counter() - start,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
    }
    return write(out, stem, args.task, tables, settings)


if __name__ == "__main__":
    main()
