"""Issue 13 item 5: SR-SMC against temperature / top-p, the gen-PPL vs entropy frontier.

Every point samples ``--num-samples`` unconditional answers of ``--seq-len`` tokens from the
embedded MDLM (ancestral unmasking, the same seeds for every point) and reports, with standard
errors, the generative perplexity under SmolLM2-135M (token-weighted) and the mean per-sample
unigram entropy (nats). Families:

- ``temperature``: the base sampler (N=1, no potential) at temperature T, ``--steps`` steps;
- ``top-p``: the base sampler with nucleus sampling;
- ``SR-SMC N=4`` / ``SR-SMC N=8``: ``SelfRewardSpec(beta)`` (target ``p0^(1+beta)``), the
  resampling of ``configs/methods/embedded/srsmc.yaml`` (ESS < N/2), temperature 1, either at
  **equal steps** (``--steps`` steps, so N times the base sampler's NFE) or at **equal NFE**:
  ``match_budget(method, steps)``, i.e. the base sampler's budget of ``--steps`` network
  evaluations per answer split over the N particles (N=4: steps/4 steps, N=8: steps/8).

NFE counts denoiser evaluations per answer, nominally (``N x steps``); every point runs with
the logit cache (the embedded MDLM has no time conditioning, so a row whose tokens did not change
keeps its logits: identical samples, fewer evaluations, reported as ``nfe_evaluated``). SR-SMC
points measured before 2026-12-02 ran without it; their samples are the same.

Standard errors: entropy ``std(ddof=1) / sqrt(n)``; gen PPL by the delta method on the
token-weighted ratio ``m = sum_i a_i / sum_i b_i`` (``a_i`` summed NLL of answer i, ``b_i`` its
scored tokens): ``SE(log ppl) = sqrt(var_i(a_i - m b_i) / n) / mean(b)``, ``SE(ppl) = ppl x
SE(log ppl)`` (``ratio_ppl_se``).

Each finished point is written to ``OUT/points/<key>.json`` at once; the report (``OUT/
srsmc_frontier.md``, ``.json``, ``.png``) is rebuilt from every point file in ``OUT/points``,
so several processes can share one grid (``--shard i/k``) and ``--report-only`` merges them::

    python experiments/srsmc_frontier.py --num-samples 128 --out experiments/results
    python experiments/srsmc_frontier.py --grid full --shard 0/2 --out DIR   # and 1/2, then
    python experiments/srsmc_frontier.py --report-only --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRSMC_CONFIG = ROOT / "configs/methods/embedded/srsmc.yaml"

TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
TOP_PS = (0.95, 0.9, 0.8)
BETAS = (0.25, 0.5, 1.0, 2.0)
PARTICLES = (4, 8)
FAMILIES = ("temperature", "top-p", "SR-SMC N=4", "SR-SMC N=8")


# ------------------------------------------------------------------------- statistics
def ratio_ppl_se(nll: torch.Tensor | list, tokens: torch.Tensor | list) -> tuple[float, float]:
    """Token-weighted perplexity ``exp(sum a / sum b)`` and its delta-method standard error.

    ``nll`` (``a_i``): summed NLL of each sample; ``tokens`` (``b_i``): its scored tokens.
    With ``m = sum a / sum b``: ``SE(log ppl) = sqrt(var(a - m b) / n) / mean(b)`` (``var``
    with ddof=1), ``SE(ppl) = ppl * SE(log ppl)``. Samples with no scored token are kept (they
    add 0 to both sums). Needs ``n >= 2``."""
    a = torch.as_tensor(nll, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(tokens, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"ratio_ppl_se needs >= 2 paired samples, got {a.numel()}, {b.numel()}")
    if float(b.sum()) <= 0:
        raise ValueError("ratio_ppl_se: no scored token")
    m = a.sum() / b.sum()
    ppl = float(torch.exp(m))
    se_log = float((a - m * b).var(unbiased=True).div(a.numel()).sqrt() / b.mean())
    return ppl, ppl * se_log


def mean_se(values: torch.Tensor | list) -> tuple[float, float]:
    """Mean and ``std(ddof=1) / sqrt(n)``."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if x.numel() < 2:
        raise ValueError(f"mean_se needs >= 2 samples, got {x.numel()}")
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(x.numel()))


# ------------------------------------------------------------------------------ grid
def make_grid(name: str) -> list[dict]:
    """Point specs: ``key, family, budget ('equal steps' | 'equal NFE'), N, beta, temperature,
    top_p``. ``full``: the issue's grid; ``run``: the part measured in the committed results
    (the full grid is ~3.4 h of one CPU core here; see the report)."""
    points = []
    for t in TEMPERATURES:
        points.append(dict(key=f"temp{t}", family="temperature", N=1, temperature=t))
    for p in TOP_PS:
        points.append(dict(key=f"topp{p}", family="top-p", N=1, top_p=p))
    for n in PARTICLES:
        for budget in ("equal steps", "equal NFE"):
            for beta in BETAS:
                tag = "steps" if budget == "equal steps" else "nfe"
                points.append(
                    dict(key=f"srsmc-n{n}-b{beta}-{tag}", family=f"SR-SMC N={n}", N=n, beta=beta,
                         budget=budget)
                )  # fmt: skip
    for p in points:
        p.setdefault("budget", "equal steps")
        p.setdefault("beta", None)
        p.setdefault("temperature", 1.0)
        p.setdefault("top_p", 1.0)
    if name == "full":
        return points
    if name == "run":
        keep = [f"temp{t}" for t in TEMPERATURES] + ["topp0.9"]
        keep += [f"srsmc-n4-b{b}-steps" for b in (0.5, 1.0, 2.0)]
        keep += [f"srsmc-n4-b{b}-nfe" for b in (0.5, 1.0, 2.0)] + ["srsmc-n8-b1.0-nfe"]
        by_key = {p["key"]: p for p in points}
        return [by_key[k] for k in keep]
    raise ValueError(f"--grid {name!r}: use 'run' or 'full'")


def point_method(point: dict, steps: int):
    """The ``Method`` of a point: SR-SMC from the srsmc config (its resampling and unmasking),
    the base sampler as that method with one particle and no potential."""
    from lightning_smc.methods import SelfRewardSpec, load_method_config, match_budget

    base = load_method_config(SRSMC_CONFIG, []).method
    if point["N"] == 1:
        return dataclasses.replace(
            base, name=point["key"], num_particles=1, num_steps=steps, potential=None,
            temperature=point["temperature"], top_p=point["top_p"], cache=True,
        )  # fmt: skip
    method = dataclasses.replace(
        base, name=point["key"], num_particles=point["N"], num_steps=steps,
        potential=SelfRewardSpec(beta=point["beta"]), cache=True,
    )  # fmt: skip
    if point["budget"] == "equal NFE":  # the base sampler's budget: `steps` evaluations
        method = match_budget(method, steps)
    return method


# ------------------------------------------------------------------------------- run
def run_point(point, args, denoiser, tokenizer, scorer) -> dict:
    from lightning_smc.evaluation import run_method
    from lightning_smc.metrics.diversity import distinct_n, unigram_entropy

    method = point_method(point, args.steps)
    batch = max(1, args.batch_rows // method.num_particles)
    start = time.perf_counter()
    result = run_method(
        method, denoiser, tokenizer, num_samples=args.num_samples, seq_len=args.seq_len,
        batch_size=batch, seed=args.seed,
    )  # fmt: skip
    sample_s = time.perf_counter() - start
    entropy = [unigram_entropy(row) for row in result.tokens]
    row = dict(point)
    row.update(
        steps=method.num_steps,
        n=len(result),
        seq_len=args.seq_len,
        seed=args.seed,
        nfe=method.num_particles * method.num_steps,
        nfe_evaluated=result.nfe * method.num_particles,
        ess=result.ess,
        resamples=float(result.resampled.double().sum(-1).mean()),
        sample_seconds=sample_s,
        seconds_per_answer=sample_s / len(result),
    )
    row["entropy"], row["entropy_se"] = mean_se(entropy)
    try:
        row["dist_2"] = distinct_n(result.texts, 2)
    except ValueError:
        row["dist_2"] = None
    if scorer is not None:
        start = time.perf_counter()
        nll, counts = scorer.score(list(result.texts))
        row["score_seconds"] = time.perf_counter() - start
        row["gen_ppl"], row["gen_ppl_se"] = ratio_ppl_se(nll, counts)
        row["scored_tokens"] = int(counts.sum())
        row["per_sample_nll"] = [float(x) for x in nll]
        row["per_sample_tokens"] = [int(x) for x in counts]
    row["per_sample_entropy"] = entropy
    row["example"] = result.texts[0][:200]
    return row


# ---------------------------------------------------------------------------- report
def _fmt(value, se=None, digits=1):
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text if se is None else f"{text} ± {se:.{digits}f}"


def _label(row) -> str:
    if row["family"] == "temperature":
        return f"base, T = {row['temperature']}"
    if row["family"] == "top-p":
        return f"base, top-p = {row['top_p']}"
    return f"SR-SMC N={row['N']}, β = {row['beta']} ({row['budget']})"


def temperature_curve(rows: list[dict], entropy: float) -> float | None:
    """Gen PPL of the temperature family at ``entropy``: log-linear interpolation between the
    two neighbouring temperature points (``None`` outside their entropy range)."""
    curve = sorted(
        (r["entropy"], math.log(r["gen_ppl"]))
        for r in rows
        if r["family"] == "temperature" and "gen_ppl" in r
    )
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= entropy <= x1 and x1 > x0:
            return math.exp(y0 + (y1 - y0) * (entropy - x0) / (x1 - x0))
    return None


def write_report(out: Path, args) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))]
    order = {p["key"]: i for i, p in enumerate(make_grid("full"))}
    rows.sort(key=lambda r: order.get(r["key"], len(order)))
    if not rows:
        raise SystemExit(f"no point files under {out / 'points'}")
    has_ppl = any("gen_ppl" in r for r in rows)
    lines = [
        f"SR-SMC vs temperature / top-p on the embedded MDLM: {rows[0]['n']} unconditional "
        f"answers of {rows[0]['seq_len']} tokens per point, seed {rows[0]['seed']}, ancestral "
        "unmasking; gen PPL under SmolLM2-135M (token-weighted), entropy = mean per-sample "
        "unigram entropy (nats); ± one standard error (gen PPL: delta method on the "
        "token-weighted ratio; entropy: std/sqrt(n)). NFE = network evaluations per answer "
        "(N x steps). Equal NFE = the base sampler's 64 evaluations per answer "
        "(`match_budget`: N=4 -> 16 steps, N=8 -> 8 steps). 'Temperature curve at this "
        "entropy': the base sampler's gen PPL at the same entropy, log-linearly interpolated "
        "between the two neighbouring temperature points (— outside their range). Seconds are "
        "wall time on a shared, heavily loaded 2-core machine (one thread per process); the "
        "SR-SMC points measured since 2026-12-02 (N = 8 and N = 4, β = 0.5 / 2 at equal steps) "
        "ran with the logit cache: the same samples with fewer network calls (`nfe_evaluated` in "
        "the JSON), so their seconds are not comparable with the others'.",
        "",
        "| point | N | steps | NFE | gen PPL | temperature curve at this entropy | entropy "
        "| Dist-2 | ESS/N | s / answer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        curve = None
        if r["family"] != "temperature" and has_ppl:
            curve = temperature_curve(rows, r["entropy"])
        lines.append(
            f"| {_label(r)} | {r['N']} | {r['steps']} | {r['nfe']} | "
            f"{_fmt(r.get('gen_ppl'), r.get('gen_ppl_se'))} | {_fmt(curve)} | "
            f"{_fmt(r['entropy'], r['entropy_se'], 3)} | {_fmt(r.get('dist_2'), None, 3)} | "
            f"{r['ess']:.2f} | {r['seconds_per_answer']:.2f} |"
        )
    missing = [p["key"] for p in make_grid("full") if p["key"] not in {r["key"] for r in rows}]
    if missing:
        lines += ["", "Not measured (CPU time): " + ", ".join(missing) + "."]
    (out / "srsmc_frontier.md").write_text("\n".join(lines) + "\n")
    summary = [{k: v for k, v in r.items() if not k.startswith("per_sample_")} for r in rows]
    meta = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "points": summary,
        "per_sample": {
            r["key"]: {k: v for k, v in r.items() if k.startswith("per_sample_")} for r in rows
        },
    }
    (out / "srsmc_frontier.json").write_text(json.dumps(meta, indent=1) + "\n")
    if has_ppl:
        plot(rows, out / "srsmc_frontier.png")
    print("\n".join(lines), flush=True)
    return rows


STYLE = {
    "temperature": dict(color="tab:blue", marker="o"),
    "top-p": dict(color="tab:green", marker="s"),
    "SR-SMC N=4": dict(color="tab:red", marker="D"),
    "SR-SMC N=8": dict(color="tab:purple", marker="^"),
}


def _draw(ax, rows: list[dict], tag_all: bool) -> None:
    """One series per family and budget (equal NFE: hollow markers, dashed)."""
    for family in FAMILIES:
        for budget in ("equal steps", "equal NFE"):
            series = [r for r in rows if r["family"] == family and r["budget"] == budget]
            series = sorted((r for r in series if "gen_ppl" in r), key=lambda r: r["entropy"])
            if not series:
                continue
            hollow, base = budget == "equal NFE", family in ("temperature", "top-p")
            if base:
                label = f"{family} (N=1, {series[0]['steps']} steps, NFE {series[0]['nfe']})"
            elif budget == "equal steps":
                label = (
                    f"{family}, equal steps ({series[0]['steps']} steps, NFE {series[0]['nfe']})"
                )
            else:
                label = f"{family}, equal NFE ({series[0]['steps']} steps, NFE {series[0]['nfe']})"
            st = STYLE[family]
            ax.errorbar(
                [r["entropy"] for r in series], [r["gen_ppl"] for r in series],
                xerr=[r["entropy_se"] for r in series], yerr=[r["gen_ppl_se"] for r in series],
                color=st["color"], marker=st["marker"], markersize=7, capsize=3,
                linestyle="--" if hollow else "-", markerfacecolor="white" if hollow else st["color"],
                label=label,
            )  # fmt: skip
            if not (tag_all or base):
                continue
            for i, r in enumerate(series):
                tag = (
                    f"T={r['temperature']}" if family == "temperature"
                    else f"p={r['top_p']}" if family == "top-p" else f"β={r['beta']}"
                )  # fmt: skip
                stagger = -12 - 11 * (i % 2) if hollow else 4  # neighbours: alternate rows
                offset = (-34, 4) if family == "temperature" else (6, stagger)
                ax.annotate(tag, (r["entropy"], r["gen_ppl"]), textcoords="offset points",
                            xytext=offset, fontsize=8, color=st["color"])  # fmt: skip
    ax.set_yscale("log")
    fmt = matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.set_xlabel("unigram entropy per sample (nats); higher = more diverse")
    ax.grid(True, which="both", alpha=0.3)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot(rows: list[dict], path: Path) -> None:
    """Left: every point; right: a zoom on the SR-SMC / top-p points (tagged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6.2))
    _draw(ax, rows, tag_all=False)
    _draw(zoom, rows, tag_all=True)
    ax.set_ylabel("generative perplexity, SmolLM2-135M (log scale); lower = better")
    n = rows[0]["n"]
    ax.set_title(f"Embedded MDLM, {n} answers x {rows[0]['seq_len']} tokens per point (± 1 SE)")
    ax.legend(fontsize=8, loc="upper left")
    others = [r for r in rows if r["family"] != "temperature" and "gen_ppl" in r] or rows
    x = [r["entropy"] for r in others]
    y = [r["gen_ppl"] for r in others if "gen_ppl" in r] or [1.0]
    zoom.set_xlim(min(x) - 0.06, max(x) + 0.06)
    zoom.set_ylim(min(y) * 0.8, max(y) * 1.2)
    zoom.set_title("zoom on the SR-SMC and top-p points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def restore_points(report: Path, out: Path) -> list[str]:
    """Write the point files of a report JSON (its summary rows plus their per-sample values)
    into ``out/points``, skipping keys already there; returns the keys written."""
    if not report.is_file():
        raise SystemExit(f"--restore: {report} is not a file (a srsmc_frontier.json report)")
    meta = json.loads(report.read_text())
    if "points" not in meta or "per_sample" not in meta:
        raise SystemExit(f"--restore: {report} has no 'points' / 'per_sample' (not a report)")
    written = []
    for row in meta["points"]:
        path = out / "points" / f"{row['key']}.json"
        if path.exists():
            continue
        full = dict(row, **meta["per_sample"].get(row["key"], {}))
        tmp = path.with_suffix(".tmp")  # as main writes a point: a reader never sees half a file
        tmp.write_text(json.dumps(full) + "\n")
        tmp.replace(path)
        written.append(row["key"])
    print(f"restored {len(written)} point(s) from {report}", flush=True)
    return written


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/srsmc_frontier")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="base steps = the equal-NFE budget")
    parser.add_argument("--grid", default="run", help="'run' (committed subset) or 'full'")
    parser.add_argument("--points", default=None, help="comma-separated point keys (a subset)")
    parser.add_argument("--shard", default="0/1", help="i/k: this process runs every k-th point")
    parser.add_argument("--batch-rows", type=int, default=32, help="particle rows per call")
    parser.add_argument("--gen-ppl", type=int, default=1, help="0: skip the SmolLM2 scorer")
    parser.add_argument("--scorer-batch", type=int, default=16)
    parser.add_argument("--redo", action="store_true", help="re-run points already on disk")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--restore", type=Path, default=None,
        help="a report JSON (e.g. experiments/results/srsmc_frontier.json): write its points "
        "into OUT/points first (those not already there), so new points join committed ones",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out
    (out / "points").mkdir(parents=True, exist_ok=True)
    if args.restore is not None:
        restore_points(args.restore, out)
    if args.report_only:
        return write_report(out, args)

    grid = make_grid(args.grid)
    if args.points:
        wanted = args.points.split(",")
        by_key = {p["key"]: p for p in make_grid("full")}
        unknown = [k for k in wanted if k not in by_key]
        if unknown:
            raise SystemExit(f"--points: unknown {unknown}; known: {sorted(by_key)}")
        grid = [by_key[k] for k in wanted]
    index, count = (int(x) for x in args.shard.split("/"))
    grid = grid[index::count]

    from lightning_smc.metrics import GenerativePerplexity
    from lightning_smc.models.loading import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    denoiser, spec = load_model("embedded")
    scorer = GenerativePerplexity(batch_size=args.scorer_batch) if args.gen_ppl else None
    total = time.perf_counter()
    for i, point in enumerate(grid, 1):
        path = out / "points" / f"{point['key']}.json"
        if path.exists() and not args.redo:
            print(f"[{i}/{len(grid)}] {point['key']}: on disk, skipped", flush=True)
            continue
        lock = path.with_suffix(".lock")  # another process (--shard / --points) runs it
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            print(f"[{i}/{len(grid)}] {point['key']}: {lock.name} exists, skipped", flush=True)
            continue
        print(f"[{i}/{len(grid)}] {point['key']} ...", flush=True)
        start = time.perf_counter()
        try:
            row = run_point(point, args, denoiser, spec.tokenizer, scorer)
            row["total_seconds"] = time.perf_counter() - start
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row) + "\n")
            tmp.replace(path)
        finally:
            lock.unlink(missing_ok=True)
        print(
            f"    gen_ppl {_fmt(row.get('gen_ppl'), row.get('gen_ppl_se'))}  entropy "
            f"{_fmt(row['entropy'], row['entropy_se'], 3)}  NFE {row['nfe']}  "
            f"{row['total_seconds']:.0f} s (elapsed {time.perf_counter() - total:.0f} s)",
            flush=True,
        )
    return write_report(out, args)


if __name__ == "__main__":
    main()
