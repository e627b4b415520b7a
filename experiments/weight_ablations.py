"""Remove one weight term at a time and watch the exact-target tests fail.

    python experiments/weight_ablations.py          # runs tests/test_exact_targets.py once per ablation

Each ablation is a monkeypatch applied inside a pytest subprocess (this file is loaded as a
plugin with ``-p weight_ablations`` and reads ``LSMC_ABLATION``). A correct test suite passes
with ``none`` and fails for every other row on the tests that exercise that term.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _apply(name: str) -> None:
    import lightning_smc.sampler as sampler_mod
    from lightning_smc import potentials, proposals

    if name == "no-self-reward-weight":  # SR-SMC without its log-confidence increments
        init = potentials.SelfReward.__init__

        def patched(self, beta=1.0):
            init(self, beta)
            self.exponent = 1.0

        potentials.SelfReward.__init__ = patched
    elif name == "no-proposal-correction":  # drop log p - log q for a second denoiser
        init = proposals.DenoiserProposal.__init__
        proposals.DenoiserProposal.__init__ = lambda self, d, correct=True: init(
            self, d, correct=False
        )
    elif name == "no-final-reward":  # never multiply in exp(r(x0) / alpha) at the end
        potentials.RewardTilt.final_twist = lambda self, x0: None
    elif name == "no-product-normalizer":  # propose from the mixture but drop its normalizer
        propagate = sampler_mod.SMCSampler._propagate

        def patched(self, ctx, base_lp, *args, **kwargs):
            x_s, inc = propagate(self, ctx, base_lp, *args, **kwargs)
            return x_s, torch.zeros_like(inc) if isinstance(
                self.potential, potentials.ProductTarget
            ) else inc

        sampler_mod.SMCSampler._propagate = patched
    elif name == "no-resample-in-log-Z":  # forget log mean exp(log w) when resampling
        log_mean_exp = sampler_mod.log_mean_exp
        resample = sampler_mod.SMCSampler._resample

        def patched(self, log_w, log_Z, *args):
            sampler_mod.log_mean_exp = lambda x, dim=-1: torch.zeros_like(x.select(dim, 0))
            try:
                return resample(self, log_w, log_Z, *args)
            finally:
                sampler_mod.log_mean_exp = log_mean_exp

        sampler_mod.SMCSampler._resample = patched
    elif name != "none":
        raise ValueError(f"unknown ablation {name!r}")


if os.environ.get("LSMC_ABLATION"):
    _apply(os.environ["LSMC_ABLATION"])

ABLATIONS = [
    "none",
    "no-self-reward-weight",
    "no-proposal-correction",
    "no-final-reward",
    "no-product-normalizer",
    "no-resample-in-log-Z",
]


def run_ablation(name: str, select: str | None = None) -> subprocess.CompletedProcess:
    """Run tests/test_exact_targets.py (optionally ``-k select``) with ablation ``name`` applied."""
    env = dict(os.environ, LSMC_ABLATION=name, PYTHONPATH=str(ROOT / "experiments"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "weight_ablations",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_exact_targets.py"),
        *(["-k", select] if select else []),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def main() -> None:
    print(f"{'ablation':<26} {'passed':>6} {'failed':>6}  failing tests")
    for name in ABLATIONS:
        res = run_ablation(name)
        failed = sorted(set(re.findall(r"FAILED tests/test_exact_targets.py::(\S+)", res.stdout)))
        n_pass = int(m.group(1)) if (m := re.search(r"(\d+) passed", res.stdout)) else 0
        n_fail = int(m.group(1)) if (m := re.search(r"(\d+) failed", res.stdout)) else 0
        print(f"{name:<26} {n_pass:>6} {n_fail:>6}  {', '.join(failed)}")


if __name__ == "__main__":
    main()
