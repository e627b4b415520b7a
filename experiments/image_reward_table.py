"""Reward steering on the embedded image model (issue 15): every method, every cell with an SE.

The task of ``configs/methods/images/``: steer the model's unconditional samples (the null class,
``--prompt 10``) towards Sneaker (class 7) under the target ``p(x) exp(r(x) / alpha)`` with
``r = ClassReward(7)`` = ``log p_clf(7 | decoded image)`` (the committed classifier, clamped at
-10) and ``alpha = 1``, i.e. ``p(x) p_clf(7 | x)``. The rows are those of
``experiments/reward_smc_table.py`` (whose helpers this script reuses):

============  ===============================  ==================================================
row           config                           what it is
============  ===============================  ==================================================
base (N=1)    best_of_n.yaml, N=1              the plain sampler
best-of-N     best_of_n.yaml                   N independent samples, the highest reward kept
SMCbase       smc_base.yaml                    reward tilt, base proposal, resampling
SMCgrad       smc_grad.yaml                    + gradient proposal (through the VQ decoder)
SMCamot       smc_amot.yaml                    + amortized LoRA proposal (``--adapter``)
Propgrad      prop_grad.yaml, N=1              the gradient proposal alone
Propamot      prop_amot.yaml, N=1              the amortized proposal alone
============  ===============================  ==================================================

Columns: ``reward`` (mean ``r`` of the answers); ``success`` = ``r > log 0.5`` (the steered
classifier gives class 7 probability above 1/2, on the reward's own VQ decoding); ``argmax = 7``
= the committed classifier's argmax on the decoded images is class 7 (the looser criterion:
``p > 1/2`` implies it); ``holdout`` / ``holdout success`` the same with the holdout classifier
(``HoldoutClassReward``, another architecture and seed, never steered on), ``holdout argmax =
7`` likewise; FID to the real test images of class 7 (torch-fidelity with the domain classifier
as feature extractor, as ``image_cfg_table.py``; FID(n) on all answers, FID@n/splits mean ± SE
over ``--splits`` disjoint subsets), IS; ESS / N (mean over the steps), NFE and seconds per
image (NFE: the network evaluations of all N particles, as ``match_budget`` counts). SEs:
means over images ``std(ddof=1) / sqrt(n)``; the argmax rates binomial
``sqrt(p (1 - p) / n)``; seconds are batch wall times shared by the images of a batch.

Budgets (``--budget``): ``equal-steps`` runs every method at its config's steps (``--steps``
overrides); ``equal-nfe`` gives each method the steps that spend what SMCbase spends
(``N * steps`` network evaluations per image, ``lightning_smc.methods.match_budget``): the
amortized proposal costs 2 evaluations per particle-step; the gradient proposal 1 plus a reward
forward + backward through the VQ decoder and classifier, which the NFE does not count (its cost
shows in the seconds).

    python experiments/image_reward_table.py --num-samples 256 --particles 8 --budget both \\
        --out experiments/results/image_reward_table

writes ``<out>/image_reward_table.md`` / ``.json`` (every cell, its SE and the settings) and
``<out>/grid_<budget>_<method>.png`` (the first 64 answers, 8 x 8, upscaled x 2). Parts in
parallel: ``--methods`` (and ``--budget``) subsets, each with its own ``--out``, then
``--merge PART/image_reward_table.json ... --out DIR`` (rows joined, grids copied).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_cfg_table import scores  # noqa: E402
from reward_smc_table import (  # noqa: E402
    AMORTIZED,
    BUDGETS,
    METHODS,
    SINGLE,
    cell,
    finite,
    mean_se,
    scorer_name,
)

from lightning_smc.data.images import DEFAULT_ROOT, load_fashion_mnist  # noqa: E402
from lightning_smc.evaluation.images import image_grid, sample_images, save_png  # noqa: E402
from lightning_smc.methods import (  # noqa: E402
    evaluations_per_step,
    load_method_config,
    match_budget,
)
from lightning_smc.metrics.sample_metrics import success_threshold_of  # noqa: E402
from lightning_smc.models.image import load_image_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "configs" / "methods" / "images"
STEM = "image_reward_table"
COLUMNS = [  # (key, header, format)
    ("reward", "reward", ".3f"),
    ("success", "success (p > 1/2)", ".3f"),
    ("accuracy", "argmax = 7", ".3f"),
    ("holdout", "holdout", ".3f"),
    ("holdout_success", "holdout success", ".3f"),
    ("holdout_accuracy", "holdout argmax = 7", ".3f"),
    ("fid_split", "FID@{split}", ".2f"),
    ("fid", "FID (n={n})", ".2f"),
    ("isc", "IS", ".2f"),
    ("ess", "ESS/N", ".3f"),
    ("nfe", "NFE", ".0f"),
    ("seconds", "s / image", ".4f"),
]


# ---------------------------------------------------------------------- configs
def load_run(name: str, args: argparse.Namespace, budget: int | None):
    """The parsed method config of ``name`` (``configs/methods/images``) with the command
    line's sizes, steps matched to ``budget`` (NFE per image) when given."""
    if name not in METHODS:
        raise ValueError(f"method {name!r}: choose from {METHODS}")
    path = FOLDER / ("best_of_n.yaml" if name == "base" else f"{name}.yaml")
    overrides = ["--num_samples", str(args.num_samples), "--seed", str(args.seed)]
    overrides += ["--method.num_particles", str(1 if name in SINGLE else args.particles)]
    if name == "base":
        overrides += ["--method.name", "base"]
    for flag, value in (
        ("model", args.model),
        ("batch_size", args.batch_size),
        ("method.num_steps", args.steps),
        ("method.unmasking", args.unmasking),
    ):
        if value is not None:
            overrides += [f"--{flag}", str(value)]
    if name in AMORTIZED:
        overrides += ["--method.proposal.init_args.adapter", str(args.adapter)]
    run = load_method_config(path, overrides)
    if budget is not None:
        run = dataclasses.replace(run, method=match_budget(run.method, budget))
    return run


def nfe_budget(args: argparse.Namespace) -> int:
    """What SMCbase spends per image at its (or ``--steps``) steps: ``N * steps * evals``."""
    method = load_run("smc_base", args, None).method
    return method.num_particles * method.num_steps * evaluations_per_step(method)


def label_of(name: str, run) -> str:
    particles = run.method.num_particles
    if name == "base":
        return "base (N=1)"
    if name == "best_of_n":
        return f"best-of-{particles}"
    return f"{run.method.name.split('-')[0]} (N={particles})"


# ---------------------------------------------------------------------- one method
def class_reference(args: argparse.Namespace, target: int) -> torch.Tensor:
    """The real test images of class ``target``, uint8 ``[K, 1, 28, 28]``."""
    images, labels = load_fashion_mnist(args.data_root, "test")
    pick = torch.as_tensor(labels.copy()).long() == target
    return torch.from_numpy(images.copy()).unsqueeze(1)[pick]


def per_image(result, run) -> dict[str, torch.Tensor]:
    """Every per-image value of one method's answers (float64 ``[S]``)."""
    tokens = result.tokens
    with torch.no_grad():
        values = {"reward": run.reward(tokens).double().cpu()}
        if run.holdout is not None:
            values["holdout"] = run.holdout(tokens).double().cpu()
    for key, scorer in (("success", run.reward), ("holdout_success", run.holdout)):
        threshold = success_threshold_of(scorer) if scorer is not None else None
        if threshold is not None:
            source = "reward" if key == "success" else "holdout"
            values[key] = (values[source] > threshold).double()
    values["ess"] = result.ess.double().mean(-1) / result.log_weights.shape[-1]
    values["nfe"] = result.sample_nfe * result.log_weights.shape[-1]  # all N particles
    values["seconds"] = result.sample_seconds
    return values


def run_method(name: str, budget_name: str, budget, args, model, reference) -> dict[str, Any]:
    run = load_run(name, args, budget)
    target = run.reward.target
    labels = torch.full((args.num_samples,), args.prompt, dtype=torch.long)
    start = time.perf_counter()
    result = sample_images(
        run.method,
        model,
        labels,
        seed=run.seed,
        batch_size=run.batch_size,
        reward=run.reward,
        guide=run.guide,
    )
    cells = {k: mean_se(v.numpy()) for k, v in per_image(result, run).items()}
    metrics = scores(
        result.images,
        torch.full_like(labels, target),
        reference,
        args.splits,
        reference_name=f"fmnist-test-class{target}-{len(reference)}",
    )
    for key in ("accuracy", "holdout_accuracy", "fid_split", "fid", "isc", "kid"):
        cells[key] = (metrics[key], metrics.get(f"{key}_se"))
    for key in ("precision", "recall"):
        cells[key] = (metrics[key], None)
    row = {
        "method": label_of(name, run),
        "key": name,
        "budget": budget_name,
        "nfe_budget": budget,
        "num_particles": run.method.num_particles,
        "num_steps": run.method.num_steps,
        "unmasking": run.method.unmasking,
        "alpha": getattr(run.method.potential, "alpha", None),
        "n": len(result.tokens),
        "cells": {k: {"value": v, "se": se} for k, (v, se) in cells.items()},
        "total_s": time.perf_counter() - start,
        "grid": grid_file(budget_name, name),
    }
    # the first 64 answers, 8 x 8, nearest-neighbour x 2
    first = result.images[:64]
    big = torch.nn.functional.interpolate(first, scale_factor=2, mode="nearest")
    save_png(image_grid(big, nrow=8), args.out / row["grid"])
    brief = {k: round(c["value"], 4) for k, c in row["cells"].items()}
    print(f"[{budget_name}] {row['method']} steps={row['num_steps']} "
          f"{row['total_s']:.1f}s {brief}", flush=True)  # fmt: skip
    return row


def reward_name(reward: Any) -> str:
    """``ClassReward(target=7, clamp_min=-10.0)``-like labels (``scorer_name`` otherwise)."""
    if hasattr(reward, "extra_repr") and hasattr(reward, "target"):
        return f"{type(reward).__name__}({reward.extra_repr()})"
    return scorer_name(reward)


def reused_row(tables: dict[str, list[dict]], name: str, steps: int) -> dict | None:
    """The equal-steps row of ``name`` when it ran at ``steps`` steps (equal NFE then asks for
    the very same run: same config, steps and seeds, so the same images), else ``None``."""
    for row in tables.get("equal-steps", []):
        if row["key"] == name and row["num_steps"] == steps:
            return row
    return None


def grid_file(budget_name: str, key: str) -> str:
    return f"grid_{budget_name}_{key}.png"


# ---------------------------------------------------------------------- the table
def markdown(tables: dict[str, list[dict]], settings: dict[str, Any]) -> str:
    commands = settings["command"]
    commands = commands if isinstance(commands, list) else [commands]
    n, splits = settings["num_samples"], settings["splits"]
    lines = [
        "# Reward steering on the embedded image model: null class -> Sneaker (class 7)",
        "",
        *[f"`{c}`" for c in commands],
        "",
        f"- {n} images per method (prompt {settings['prompt']} = the null class, seeds "
        f"`derive_seed({settings['seed']}, i)`), N = {settings['particles']} particles (base, "
        f"Propgrad, Propamot: N=1); model {settings['model']}; unmasking "
        f"{settings['unmasking']}, MaskGIT cosine schedule; target p(x) exp(r(x) / alpha), "
        f"alpha = {settings['alpha']}, linear twist, one x0 draw; resampling when ESS < N / 2.",
        f"- reward (steered): {settings['reward']}; holdout (never steered on): "
        f"{settings['holdout']}; adapter (SMCamot, Propamot): {settings['adapter']}.",
        "- success: reward > log 1/2 (p_clf(7) > 1/2 on the reward's VQ decoding); argmax = 7: "
        "the classifier's argmax on the decoded images (binomial SE); holdout likewise with "
        "the holdout classifier.",
        f"- FID to the {settings['reference_size']} real test images of class 7 (domain "
        f"classifier features, torch-fidelity): FID@{n // splits} mean ± SE over {splits} "
        f"disjoint subsets, FID (n={n}) on all images (no SE; biased up at small n: compare "
        "within a column); IS ± std/sqrt(10) of torch-fidelity's splits.",
        "- every other cell: mean ± std(ddof=1)/sqrt(n) over the images; seconds are batch wall "
        "times shared by the images of a batch. An equal-NFE row whose steps equal its "
        "equal-steps row's is that run (same config, steps and seeds), not sampled twice.",
        f"- wall time: {settings['wall_s'] / 60:.1f} min on {settings['machine']}, torch "
        f"{settings['torch']}"
        + (" (parts run separately: the longest part)." if len(commands) > 1 else "."),
        "",
    ]
    headers = [h.format(split=n // splits, n=n) for _, h, _ in COLUMNS]
    for budget_name, rows in tables.items():
        if budget_name == "equal-steps":
            lines.append("## Equal steps (every method at its config's steps)")
        else:
            nfe = rows[0]["nfe_budget"] if rows else None
            lines.append(
                f"## Equal NFE (budget {nfe} network evaluations per image = SMCbase's; "
                "`match_budget`: amortized 2 per particle-step, gradient 1 plus an uncounted "
                "reward forward + backward)"
            )
        lines += ["", "| method | steps | " + " | ".join(headers) + " |"]
        lines.append("|---|---:|" + "---:|" * len(COLUMNS))
        for row in rows:
            cells = [cell_text(row["cells"].get(k), fmt) for k, _, fmt in COLUMNS]
            lines.append(f"| {row['method']} | {row['num_steps']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            " ".join(f"![{r['method']}]({r['grid']})" for r in rows if r.get("grid")) + "\n"
        )
    return "\n".join(lines)


def cell_text(entry: dict | None, fmt: str) -> str:
    """``value ± SE`` (``reward_smc_table.cell``); a value stored as ``null`` (not finite: e.g.
    FID of a too small split) reads ``nan``, a missing SE ``value`` alone."""
    if entry is not None and entry["value"] is None:
        return "nan"
    if entry is not None and entry["se"] is None and entry["value"] is not None:
        return format(entry["value"], fmt)
    return cell(entry, fmt)


def write(out: Path, tables: dict[str, list[dict]], settings: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, settings)
    print(text)
    (out / f"{STEM}.md").write_text(text + "\n")
    record = finite({"settings": settings, "tables": tables})
    (out / f"{STEM}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def merge(parts: list[Path], out: Path, command: str) -> dict[str, Any]:
    """One table from the JSON records of runs on disjoint (budget, method) pairs with the same
    sizes; the parts' grids are copied into ``out``."""
    records = [json.loads(Path(p).read_text()) for p in parts]
    first = records[0]["settings"]
    same = ("num_samples", "particles", "seed", "prompt", "model", "splits", "unmasking")
    tables: dict[str, list[dict]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for record, path in zip(records, parts, strict=True):
        differ = [k for k in same if record["settings"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--merge: {path} differs from {parts[0]} in {differ}")
        for budget_name, rows in record["tables"].items():
            for row in rows:
                if any(r["key"] == row["key"] for r in tables.get(budget_name, [])):
                    raise ValueError(f"--merge: {row['key']} ({budget_name}) appears in two parts")
                tables.setdefault(budget_name, []).append(row)
                grid = Path(path).parent / row.get("grid", "")
                if (
                    row.get("grid")
                    and grid.is_file()
                    and grid.resolve() != (out / row["grid"]).resolve()
                ):
                    shutil.copy(grid, out / row["grid"])
    for budget_name, rows in tables.items():
        rows.sort(key=lambda r: METHODS.index(r["key"]))
        budgets = {r["nfe_budget"] for r in rows}
        if len(budgets) > 1:
            raise ValueError(f"--merge: {budget_name} rows were run at budgets {budgets}")
    tables = {b: tables[b] for b in BUDGETS if b in tables}
    settings = {**first, "wall_s": max(r["settings"]["wall_s"] for r in records)}
    settings["part_wall_s"] = [r["settings"]["wall_s"] for r in records]
    settings["command"] = [
        c
        for r in records
        for c in (
            r["settings"]["command"]
            if isinstance(r["settings"]["command"], list)
            else [r["settings"]["command"]]
        )
    ] + [command]
    return write(out, tables, settings)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--budget", choices=[*BUDGETS, "both"], default="equal-steps")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument(
        "--adapter", default="embedded_image",
        help="LoRA adapter folder for SMCamot / Propamot (default: the packaged "
        "lightning_smc/assets/fmnist_class_adapter_tiny)",
    )  # fmt: skip
    parser.add_argument("--prompt", type=int, default=10, help="class to sample (10 = null)")
    parser.add_argument("--model", default=None, help="default: the configs' (embedded_image)")
    parser.add_argument("--steps", type=int, default=None, help="default: each config's")
    parser.add_argument("--unmasking", default=None, help="default: the configs' (ancestral)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the configs'")
    parser.add_argument("--splits", type=int, default=4, help="disjoint subsets for FID's SE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=DEFAULT_ROOT)
    parser.add_argument("--out", type=Path, default=Path("outputs/image_reward_table"))
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="PART.json",
        help="join the tables of runs of disjoint --methods / --budget into --out",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    if args.num_samples < 1 or args.particles < 1 or args.splits < 2:
        parser.error("--num-samples and --particles must be >= 1, --splits >= 2")
    if args.num_samples < 2 * args.splits:
        parser.error(f"--num-samples {args.num_samples}: at least 2 per FID split ({args.splits})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python experiments/image_reward_table.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.merge:
        return merge(args.merge, args.out, command)
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    probe = load_run("smc_base", args, None)
    model = load_image_model(probe.model)
    if probe.seq_len != model.seq_len:
        raise ValueError(f"seq_len={probe.seq_len}, but the model's token grid has {model.seq_len}")
    reference = class_reference(args, probe.reward.target)
    budgets = BUDGETS if args.budget == "both" else (args.budget,)
    args.out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[dict]] = {}
    for budget_name in budgets:
        budget = nfe_budget(args) if budget_name == "equal-nfe" else None
        tables[budget_name] = []
        for name in args.methods:
            same = reused_row(tables, name, load_run(name, args, budget).method.num_steps)
            if same is not None:  # the same method, steps and seeds: the same images
                row = {**same, "budget": budget_name, "nfe_budget": budget, "reused": True}
                shutil.copy(args.out / same["grid"], args.out / grid_file(budget_name, name))
                row["grid"] = grid_file(budget_name, name)
                print(f"[{budget_name}] {row['method']}: the equal-steps run (same steps)")
            else:
                row = run_method(name, budget_name, budget, args, model, reference)
            tables[budget_name].append(row)
    settings = {
        "command": command,
        "num_samples": args.num_samples,
        "particles": args.particles,
        "prompt": args.prompt,
        "model": probe.model,
        "unmasking": probe.method.unmasking,
        "alpha": getattr(probe.method.potential, "alpha", None),
        "seed": args.seed,
        "splits": args.splits,
        "reference_size": len(reference),
        "reward": reward_name(probe.reward),
        "holdout": reward_name(probe.holdout),
        "adapter": str(args.adapter),
        "methods": args.methods,
        "wall_s": time.perf_counter() - start,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
    }
    return write(args.out, tables, settings)


if __name__ == "__main__":
    main()
