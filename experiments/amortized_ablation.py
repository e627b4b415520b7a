"""Why does the amortized proposal (SMCamot) learn or not? Diagnostics and a small ablation.

Part 1 (``--diagnose``): on rollouts of the base model (zero adapter) under the quickstart's
target (VADER tilt, ``alpha``, linear ``lambda_t``), the scale of every term of the per-transition
log-weight ``log w = [log gamma_s(x_s) - log gamma_t(x_t)] + sum_C [log p - log q]`` and the part
of the twist difference that is Monte-Carlo noise of ``r_hat`` (``num_samples`` x0 draws): the
same transition re-scored with fresh x0 draws.

Part 2 (default): train ``AmortizedProposalModule`` for ``--steps`` steps under each setting of
the ablation grid (one at a time, everything else as ``BASE``) and measure, on fixed seeds that
no setting trains on:

- ``loss``: the log-variance loss of the proposal's own rollouts (``F_psi`` included);
- ``loss_q0``: the same loss for a zero adapter on the same seeds (``F_psi`` refitted per step
  as the mean log w): the bar a learned proposal must clear;
- ``rollout_reward``: mean reward (VADER) of the proposal's own samples (Propamot, N = 1);
- SMC with the proposal (N = ``--particles``, resample every 4 steps): reward and ESS / N.

    python experiments/amortized_ablation.py --diagnose
    python experiments/amortized_ablation.py --steps 100 --out experiments/results/amortized_ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_smc.evaluation import run_method
from lightning_smc.methods import DenoiserProposalSpec, Method, RewardTiltSpec
from lightning_smc.modules import AmortizedProposalModule
from lightning_smc.modules.log_variance import transition_log_weights
from lightning_smc.rewards import VaderSentiment

#: the quickstart's module settings (configs/quickstart.yaml)
BASE: dict[str, Any] = dict(
    potential=RewardTiltSpec(alpha=0.1, schedule="linear", num_samples=1),
    seq_len=32,
    num_steps=16,
    rollouts=8,
    transitions=4,
    lora_rank=8,
    lora_alpha=16.0,
    lr=3e-3,
    normalizer_lr=1e-2,
)

#: one change at a time against BASE
GRID: dict[str, dict[str, Any]] = {
    "quickstart": {},
    "r_hat x8": {"potential": RewardTiltSpec(alpha=0.1, schedule="linear", num_samples=8)},
    "r_hat greedy": {"potential": RewardTiltSpec(alpha=0.1, schedule="linear", num_samples=0)},
    "all transitions": {"transitions": None},
    "32 rollouts, all transitions": {"rollouts": 32, "transitions": None},
    "paired greedy twist": {"twist_estimate": "paired", "twist_samples": 0},
    "paired greedy, all transitions": {
        "twist_estimate": "paired",
        "twist_samples": 0,
        "transitions": None,
    },
    "paired x4 twist": {"twist_estimate": "paired", "twist_samples": 4},
    "zero adapter, greedy twist": {  # the reference row for the greedy-twist settings
        "potential": RewardTiltSpec(alpha=0.1, schedule="linear", num_samples=0),
        "_steps": 0,
    },
    "per-state siblings x4, greedy twist": {
        "potential": RewardTiltSpec(alpha=0.1, schedule="linear", num_samples=0),
        "twist_estimate": "paired",
        "twist_samples": 0,
        "baseline": "per_state",
        "siblings": 4,
        "transitions": None,
    },
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-2": {"lr": 1e-2},
    "replay 16": {"replay_size": 16},
    "kl 0.1": {"kl_weight": 0.1},
    "rank 2": {"lora_rank": 2, "lora_alpha": 4.0},
    "F_psi mlp": {"log_normalizer": "mlp"},
}


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double().flatten()
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def diagnose(seed: int, rollouts: int, rescores: int) -> dict[str, Any]:
    """Scale of the log-weight's terms on base rollouts and the r_hat noise share."""
    torch.manual_seed(seed)
    module = AmortizedProposalModule(
        reward=VaderSentiment(tokenizer="embedded"), **{**BASE, "rollouts": rollouts}
    )
    out: dict[str, Any] = {}
    for M in (1, 8):
        module.method = dataclasses.replace(
            module.method, potential=dataclasses.replace(BASE["potential"], num_samples=M)
        )
        path = module.rollout("val", step=0)
        log_w, _ = transition_log_weights(path, module.q.base_denoiser, module.q, module.q.mask_id)
        twist = (path.twist_to - path.twist_from).double()
        # the same transitions re-scored with fresh x0 draws: the twist's Monte-Carlo noise
        sampler = module.rollout_sampler()
        potential = sampler.potential
        K, R, L_ = path.x_to.shape
        g = torch.Generator().manual_seed(seed + 1)
        draws = []
        for _ in range(rescores):
            draws.append(_twist_values(potential, module, path, g))
        draws = torch.stack(draws)  # [S, K, R]
        noise_var = draws.var(dim=0).mean(dim=1)  # [K] within-state variance of log gamma_t
        state_var = draws.mean(dim=0).var(dim=1)  # [K] across states
        out[f"num_samples={M}"] = {
            "log_w_var_per_step": log_w.var(dim=1).tolist(),
            "twist_diff_var_per_step": twist.var(dim=1).tolist(),
            "log_gamma_noise_var_per_step": noise_var.tolist(),
            "log_gamma_state_var_per_step": state_var.tolist(),
            "final_reward": mean_se(module.reward(path.x_to[-1]).double()),
        }
    return out


def _twist_values(potential: Any, module: Any, path: Any, g: torch.Generator) -> torch.Tensor:
    """``log gamma_t(x_t)`` of every recorded state ``x_to`` with fresh x0 draws."""
    from lightning_smc.potentials import RewardTilt

    assert isinstance(potential, RewardTilt)
    K, R, L_ = path.x_to.shape
    base = module.q.base_denoiser
    values = torch.zeros(K, R, dtype=torch.float64)
    for k in range(K):
        x = path.x_to[k]
        progress = (k + 1) / K
        lam = potential.schedule(progress)
        with torch.no_grad():
            t = torch.full((R,), max(1.0 - progress, 1e-6))
            lp = torch.log_softmax(base(x, t, None).float(), -1)
        masked = x == module.q.mask_id
        M = max(potential.num_samples, 1)
        x0 = x.unsqueeze(1).repeat(1, M, 1)
        where = masked.unsqueeze(1).expand_as(x0)
        probs = lp.unsqueeze(1).expand(-1, M, -1, -1)[where].exp()
        if probs.numel():
            x0[where] = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        r = potential.score(x0.reshape(-1, L_)).reshape(R, M)
        r_hat = potential.alpha * torch.logsumexp(
            r / potential.alpha, -1
        ) - potential.alpha * math.log(M)
        values[k] = lam * r_hat / potential.alpha
    return values


def evaluate(module: AmortizedProposalModule, seeds: int, particles: int) -> dict[str, Any]:
    module.eval()
    metrics: dict[str, Any] = {}
    with torch.no_grad():
        terms = [module.loss_on(module.rollout("val", step=1000 + i)) for i in range(seeds // 8)]
    metrics["loss"] = float(torch.stack([t["log_variance"] for t in terms]).mean())
    base = module.q.base_denoiser
    reward = module.reward
    steps = module.hparams.num_steps
    for name, n, resample in (("rollout", 1, "never"), ("smc", particles, "every:4")):
        method = Method(
            name=name,
            num_particles=n,
            num_steps=steps,
            potential=module.method.potential if n > 1 else None,
            proposal=DenoiserProposalSpec() if n > 1 else None,
            resample_when=resample,
        )
        # n == 1: the proposal alone (q_phi as the model); else SMC with q_phi as proposal
        result = run_method(
            method, module.q if n == 1 else base, None, num_samples=seeds, reward=reward,
            seq_len=module.hparams.seq_len, batch_size=seeds, seed=7,
            amortized=None if n == 1 else module.q,
        )  # fmt: skip
        metrics[f"{name}_reward"] = mean_se(result.reward)
        if n > 1:
            metrics["smc_ess"] = float(result.ess)  # already ESS / N
    return metrics


def train(settings: dict[str, Any], steps: int, seed: int) -> AmortizedProposalModule:
    L.seed_everything(seed, verbose=False)
    module = AmortizedProposalModule(
        reward=VaderSentiment(tokenizer="embedded"),
        **{**BASE, **settings},
        seed=seed,
        steps_per_epoch=steps,
    )
    if steps:
        trainer = L.Trainer(
            default_root_dir=tempfile.mkdtemp(prefix="amortized_ablation_"),
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module)
    return module


def report(rows: list[dict[str, Any]], seeds: int, particles: int) -> str:
    """The ablation as a markdown table (mean ± SE where the row has one)."""
    lines = [
        f"Evaluation seeds: {seeds} (never trained on); SMC: N = {particles}, 16 steps, resample "
        "every 4; rollout = the proposal alone (N = 1). `loss` uses the setting's own twist "
        "estimate, so it compares only rows with the same estimate.",
        "",
        "| setting | steps | loss | rollout reward | SMC reward | SMC ESS / N | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["setting"], str(row["steps"]), f"{row['loss']:.3f}"]
        for key in ("rollout_reward", "smc_reward"):
            mean, se = row[key]
            cells.append(f"{mean:.3f} ± {se:.3f}")
        cells += [f"{row['smc_ess']:.3f}", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, help="names from the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", action="store_true", help="only render --out's JSON")
    args = parser.parse_args(argv)
    if args.report:
        rows = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(report(rows, args.seeds, args.particles))
        print(args.out.with_suffix(".md").read_text())
        return
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.diagnose:
        print(json.dumps(diagnose(args.seed, 32, 8), indent=1))
        return
    rows = []
    names = args.only or list(GRID)
    if args.out is not None and args.out.with_suffix(".json").is_file():  # add to earlier rows
        rows = json.loads(args.out.with_suffix(".json").read_text())
    done = {row["setting"] for row in rows}
    if "zero adapter (untrained)" not in done:
        zero = evaluate(train({}, 0, args.seed), args.seeds, args.particles)
        rows.append({"setting": "zero adapter (untrained)", "steps": 0, **zero, "seconds": 0.0})
        print(rows[-1], flush=True)
    for name in names:
        settings = dict(GRID[name])
        steps = settings.pop("_steps", args.steps)  # "_steps": a fixed step count (0: untrained)
        start = time.perf_counter()
        module = train(settings, steps, args.seed)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "setting": name,
                "steps": steps,
                **evaluate(module, args.seeds, args.particles),
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(report(rows, args.seeds, args.particles))


if __name__ == "__main__":
    main()
