"""Which standard error of Dist-n is right? Bootstrap vs delete-one jackknife, against repeats.

Dist-n pools the n-grams of a set of answers (distinct / total), so it is not a mean of
per-answer values. Given a large set of answers (a ``*_samples.jsonl`` of
experiments/reward_smc_table.py), this treats the set as the population, draws ``--repeats``
subsets of ``--size`` answers without replacement and compares

- the spread of Dist-n over those subsets (finite-population corrected: the reference),
- the mean bootstrap SE of one subset (``dist_bootstrap``: 200 resamples with replacement),
- the mean jackknife SE of one subset (``dist_jackknife``).

On 1024 base-model toxicity answers (experiments/results/toxicity_base_rarity_samples.jsonl),
size 256: reference SE 0.0068 / 0.0039 / 0.0004 for Dist-1/2/3, jackknife 0.0080 / 0.0040 /
0.0004, bootstrap 0.0091 / 0.0184 / 0.0195 (a text drawn twice repeats every one of its
n-grams, so the bootstrap's Dist-n falls and spreads for reasons unrelated to sampling).

    python experiments/dist_se_calibration.py experiments/results/toxicity_base_rarity_samples.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

_SCRIPT = Path(__file__).resolve().parent / "reward_smc_table.py"
_spec = importlib.util.spec_from_file_location("reward_smc_table", _SCRIPT)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--bootstrap-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    texts = [json.loads(line)["text"] for line in args.samples.read_text().splitlines()]
    if args.size >= len(texts):
        parser.error(f"--size {args.size} must be below the {len(texts)} answers")
    rng = np.random.default_rng(args.seed)
    correction = math.sqrt(1 - args.size / len(texts))
    for n in (1, 2, 3):
        values, boots, jacks = [], [], []
        for r in range(args.repeats):
            subset = [texts[i] for i in rng.choice(len(texts), args.size, replace=False)]
            value, jack = table.dist_jackknife(subset, n)
            values.append(value)
            jacks.append(jack)
            if r < args.bootstrap_repeats:
                boots.append(table.dist_bootstrap(subset, n, 200, 0)[1])
        reference = np.std(values, ddof=1) / correction
        print(
            f"Dist-{n}: mean {np.mean(values):.4f}  reference SE {reference:.4f}  "
            f"jackknife {np.mean(jacks):.4f}  bootstrap {np.mean(boots):.4f}"
        )


if __name__ == "__main__":
    main()
