"""Training curves of an amortized-proposal run from its CSV log (Lightning ``CSVLogger``).

Plots, against the optimizer step: the loss, the rollouts' mean reward and the importance ESS
of the rollouts (``train/is_ess``), each raw (faint) and as a moving average, plus the
validation values when present. Used for the model card of ``assets/sentiment_adapter_tiny``.

    python experiments/plot_training_curves.py outputs/sentiment_adapter_tiny/csv/version_0/metrics.csv \
        --out lightning_smc/assets/sentiment_adapter_tiny/training_curves.png
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

PANELS = [
    ("train/loss", "loss (log-variance)"),
    ("train/rollout_reward", "rollout reward ({reward})"),
    ("train/is_ess", "rollout importance ESS / R"),
]
#: drawn when the log has it (baseline="per_state")
OPTIONAL = [("train/sibling_var", "within-state variance of log w")]


def read_columns(path: Path, max_step: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` of the non-empty cells of a Lightning metrics.csv
    (rows up to ``max_step`` when given)."""
    columns: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            if max_step is not None and step > max_step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                number = float(value)
                if math.isfinite(number):
                    columns.setdefault(key, []).append((step, number))
    return columns


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=10, help="moving average, in log rows")
    parser.add_argument("--max-step", type=int, default=None, help="plot rows up to this step")
    parser.add_argument("--reward", default="VADER", help="the reward's name in the title")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_columns(args.csv, args.max_step)
    missing = [key for key, _ in PANELS if key not in columns]
    if missing:
        raise SystemExit(f"{args.csv} has no column(s) {missing}; is it an amortized run's log?")
    panels = PANELS + [p for p in OPTIONAL if p[0] in columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for axis, (key, title) in zip(axes, panels, strict=True):
        steps, values = zip(*columns[key], strict=True)
        axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        axis.plot(steps, moving_average(list(values), args.window), color="tab:blue", label="train")
        val_key = key.replace("train/", "val/")
        if val_key in columns:
            vs, vv = zip(*columns[val_key], strict=True)
            axis.plot(vs, vv, "o-", color="tab:orange", label="validation (fixed seeds)")
            axis.legend(fontsize=7)
        axis.set_title(title.format(reward=args.reward), fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
