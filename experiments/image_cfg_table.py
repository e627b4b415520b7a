"""The seed's MaskGIT table on the embedded image model (issues 14, 15): FID / IS / class accuracy
of class-conditional samples for CFG weight x steps x particles, plus the real data's own values
as the reference row.

CFG is the product target ``p(x | y)^w p(x | null)^(1 - w)`` per position (Meissonic's guidance
scale ``w``: logits ``u + w (c - u)``), proposed from the normalized mixture. ``N = 1``
(``--particles 1``) is the usual CFG sampler with ancestral unmasking (the committed table's
rows, unchanged). ``N > 1`` is SMC on the same product target (``ProductTargetSpec(w, null)``:
each particle's weight is the product of the mixture's normalizers), with ReMDM unmasking as
``configs/methods/images/cfg_remdm.yaml`` (``--smc-unmasking``), systematic resampling when
ESS < N / 2, the answer the highest-weight particle; ``--remdm-baseline`` adds N = 1 ReMDM rows
(the SMC rows' sampler with one particle). Every cell uses the same labels (``--per-class`` per
class, in class order) and the same seeds (sample ``i`` from ``derive_seed(seed, i)``).

Metrics (``lightning_smc.metrics.image``, torch-fidelity, offline) with the project's
Fashion-MNIST classifier as the feature extractor ("domain" FID / IS / KID / precision /
recall), against the official test split (10,000 images); class accuracy by the same classifier
and by the holdout classifier (another architecture and seed). Standard errors: accuracy
``sqrt(p (1 - p) / n)``; IS: torch-fidelity's std over its 10 splits / sqrt(10); FID: the
spread of FID over ``--splits`` disjoint subsets of the samples (FID at ``n / splits`` images,
mean ± SE; FID is biased upwards at small ``n``, so compare it only with the same column); ESS:
the ESS over the steps divided by N, per image, mean ± std / sqrt(n); NFE per image (network
evaluations of all N particles) and seconds per image likewise (seconds: each batch's wall time
shared by its images).

    python experiments/image_cfg_table.py --model embedded_image --per-class 100 \
        --particles 1,8,16 --out experiments/results/image_cfg_table

The cells are independent: run parts in parallel with ``--weights`` / ``--steps`` /
``--particles`` subsets (and ``--no-real`` on all but one part), each with its own ``--out``,
then join them with ``--merge PART/image_cfg_table.json ... --out DIR`` (rows in the table's
order; the parts' grids are copied into DIR).

Each finished batch of a cell is kept in ``OUT/blocks/<cell>/``; ``--resume`` with the same
command continues an interrupted run from its last finished batch (``sample_blocks``), so a
cell longer than one session is split at batch boundaries (``--batch-size`` sets their size).

``--diagnostic`` (with ``--particles`` >= 2) replaces the table by what the weights select:
every final particle scored by the classifier, best vs weighted vs unweighted, and the
correlation of the log-weights with ``log p_clf(y | x)`` (``particle_diagnostic``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_smc.data.images import DEFAULT_ROOT, load_fashion_mnist
from lightning_smc.evaluation.images import ImageSamples, image_grid, sample_images, save_png
from lightning_smc.methods import Method, ProductTargetSpec, build_sampler
from lightning_smc.metrics.classifier import load_classifier
from lightning_smc.metrics.image import class_accuracy, image_metrics, to_uint8
from lightning_smc.models.image import load_image_model
from lightning_smc.smc import derive_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_smc_table import mean_se  # noqa: E402

HOLDOUT = "fmnist_classifier_holdout_tiny"


def cfg_method(
    weight: float, steps: int, null_class: int, particles: int = 1, unmasking: str | None = None
) -> Method:
    """CFG ``weight`` at ``steps`` steps with ``particles`` particles: ``N = 1`` with the default
    ``unmasking`` is the plain CFG sampler (ancestral unmasking, the committed rows); ``N > 1``
    is SMC on the product target (``unmasking`` default ``"remdm"``, resampling when ESS <
    N / 2, the highest-weight particle)."""
    if particles < 1:
        raise ValueError(f"particles={particles} must be >= 1")
    if particles > 1 and weight == 1.0:
        raise ValueError(
            f"CFG weight 1 with {particles} particles: the product target is then the "
            "conditional model alone and every particle weighs the same; use N = 1 for w = 1"
        )
    potential = None if weight == 1.0 else ProductTargetSpec(weight=weight, second_cond=null_class)
    name = f"CFG {weight:g}, {steps} steps"
    if unmasking is None:
        unmasking = "ancestral" if particles == 1 else "remdm"
    if particles > 1 or unmasking != "ancestral":  # N = 1 ancestral: the committed rows' names
        name += f", N={particles} ({'ReMDM' if unmasking == 'remdm' else unmasking})"
    return Method(
        name=name,
        num_particles=particles,
        num_steps=steps,
        unmasking=unmasking,
        schedule="maskgit_cosine",
        potential=potential,
        ess_threshold=None if particles == 1 else 0.5,
    )


def scores(
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    splits: int,
    reference_name: str | None = None,
) -> dict:
    """Domain FID / IS / KID / PRC on all images, FID per split, accuracies with SEs.
    ``reference_name`` keys torch-fidelity's cache of the reference features (default
    ``fmnist-test-<K>``: the first K test images); a different reference needs its own name."""
    n = len(images)
    name = reference_name or f"fmnist-test-{len(reference)}"
    out = image_metrics(images, reference, reference_name=name)
    out["isc_se"] = out.pop("isc_std") / math.sqrt(10)
    per_split = []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for part in order.chunk(splits):
        per_split.append(
            image_metrics(images[part], reference, ("fid",), reference_name=name)["fid"]
        )
    values = torch.tensor(per_split, dtype=torch.float64)
    out["fid_split"] = float(values.mean())
    out["fid_split_se"] = float(values.std() / math.sqrt(len(values)))
    for key, clf in (("accuracy", None), ("holdout_accuracy", HOLDOUT)):
        acc = class_accuracy(images, labels) if clf is None else class_accuracy(images, labels, clf)
        out[key], out[f"{key}_se"] = acc, math.sqrt(acc * (1 - acc) / n)
    out["n"] = n
    return out


@torch.no_grad()
def particle_diagnostic(
    model: Any,
    method: Method,
    labels: torch.Tensor,
    seed: int = 0,
    batch_size: int = 50,
    classifier: str = "fmnist_classifier_tiny",
) -> dict[str, float]:
    """What the SMC weights select (``--diagnostic``): every final particle of ``method`` is
    decoded and scored by ``classifier`` (``log p_clf(y | image)``, correct = argmax is ``y``),
    with the same labels and per-image seeds as the table's cells. Per image, over its ``N``
    final particles with normalized weights ``W_i``:

    - ``best``: the highest-weight particle (the table's answer);
    - ``weighted``: ``sum_i W_i f_i``, the SMC estimate of ``E_target[f]`` (the CFG product
      target's accuracy / log-probability);
    - ``uniform``: ``mean_i f_i``, the particle cloud without its weights;
    - ``corr``: Pearson correlation of ``log W_i`` and ``log p_clf(y | x_i)`` (images whose
      weights or scores are all equal, e.g. just resampled, are left out: ``corr_n`` counts the
      rest).

    Each value is the mean over images ± ``std / sqrt(n)``."""
    if method.num_particles < 2:
        raise ValueError(
            f"the particle diagnostic needs N >= 2 particles, got {method.num_particles}"
        )
    clf = load_classifier(classifier)
    sampler = build_sampler(method, model.denoiser)
    device = next(iter(model.denoiser.parameters())).device
    values: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(labels), batch_size):
        ids = range(lo, min(lo + batch_size, len(labels)))
        gens = [torch.Generator(device=device).manual_seed(derive_seed(seed, i)) for i in ids]
        y = labels[lo : ids.stop]
        out = sampler.sample(model.seq_len, cond=y.to(device), generator=gens)
        B, N, L = out.tokens.shape
        images = model.decode(out.tokens.reshape(B * N, L)).cpu()
        logp = clf(to_uint8(images).float().div(255.0)).log_softmax(-1).reshape(B, N, -1).double()
        target = logp.gather(-1, y.view(B, 1, 1).expand(B, N, 1)).squeeze(-1)  # [B, N]
        correct = (logp.argmax(-1) == y.view(B, 1)).double()
        log_w = out.log_weights.cpu().double()
        weights = log_w.exp()
        best = log_w.argmax(-1, keepdim=True)
        for name, f in (("accuracy", correct), ("log_p", target)):
            values.setdefault(f"{name}_best", []).append(f.gather(-1, best).squeeze(-1))
            values.setdefault(f"{name}_weighted", []).append((weights * f).sum(-1))
            values.setdefault(f"{name}_uniform", []).append(f.mean(-1))
        values.setdefault("ess", []).append(1.0 / (weights**2).sum(-1) / N)
        lw, lp = log_w - log_w.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
        norm = lw.norm(dim=-1) * lp.norm(dim=-1)
        keep = norm > 1e-9
        values.setdefault("corr", []).append((lw * lp).sum(-1)[keep] / norm[keep])
    row: dict[str, float] = {"n": len(labels), "particles": method.num_particles}
    for key, parts in values.items():
        row[key], row[f"{key}_se"] = mean_se(torch.cat(parts).numpy())
    row["corr_n"] = int(sum(len(p) for p in values["corr"]))
    return row


def diagnostic_report(rows: list[dict], command: str) -> str:
    lines = [
        "# What the CFG product target's weights select (particle diagnostic)",
        "",
        f"`{command}`",
        "",
        "Every final particle scored by the committed classifier: the highest-weight particle "
        "(the table's answer), the weighted average (the SMC estimate under the product target) "
        "and the unweighted particle mean; corr = Pearson correlation of the log-weights and "
        "log p_clf(y | x) within an image. Mean over images ± SE.",
        "",
        "| setting | n | accuracy: best | weighted | uniform | log p_clf: best | weighted | "
        "uniform | corr(log w, log p_clf) | final ESS / N |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [fmt(r, k, 3) for k in ("accuracy_best", "accuracy_weighted", "accuracy_uniform",
                                         "log_p_best", "log_p_weighted", "log_p_uniform")]  # fmt: skip
        lines.append(
            f"| {r['setting']} | {r['n']} | "
            + " | ".join(cells)
            + f" | {fmt(r, 'corr', 3)} (n={r['corr_n']}) | {fmt(r, 'ess', 3)} |"
        )
    return "\n".join(lines) + "\n"


def sampler_cells(out: ImageSamples) -> dict[str, float]:
    """ESS / N (mean over the steps, per image), NFE (all ``N`` particles) and seconds per
    image: mean and ``std / sqrt(n)`` over the images."""
    row: dict[str, float] = {}
    particles = out.log_weights.shape[-1]
    per_image = {
        "ess": out.ess.double().mean(-1) / particles,
        "nfe": out.sample_nfe * particles,  # the sampler counts per particle sequence
        "seconds": out.sample_seconds,
    }
    for key, values in per_image.items():
        row[key], row[f"{key}_se"] = mean_se(values.numpy())
    return row


def fmt(row: dict, key: str, digits: int = 2) -> str:
    if key not in row:
        return "—"
    se = row.get(f"{key}_se")
    return f"{row[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def report(rows: list[dict], settings: dict) -> str:
    particles = sorted({r.get("particles", 1) for r in rows if "particles" in r})
    smc = any(p > 1 for p in particles)
    commands = (
        settings["command"] if isinstance(settings["command"], list) else [settings["command"]]
    )
    title = "CFG x steps x particles" if smc else "CFG x steps"
    lines = [
        f"# {title} on the embedded image model (N = {', '.join(map(str, particles)) or 1})",
        "",
        *[f"`{c}`" for c in commands],
        "",
        f"- model: {settings['model']}; {settings['n']} samples per cell "
        f"({settings['per_class']} per class, the same labels and seeds in every cell); MaskGIT "
        "cosine schedule; CFG weight w as Meissonic's guidance scale (logits u + w (c - u)); "
        "w = 1 is the conditional model alone. N = 1 without a tag: the plain CFG sampler, "
        "ancestral unmasking. N > 1: SMC on the CFG product target "
        "p(x | y)^w p(x | null)^(1 - w) (weights = the mixture's normalizers), "
        f"{settings.get('smc_unmasking', 'remdm')} unmasking, systematic resampling when "
        "ESS < N / 2, the highest-weight particle.",
        "- domain metrics: torch-fidelity with the project's Fashion-MNIST classifier "
        "(`fmnist_classifier_tiny`) as feature extractor, reference = the first "
        f"{settings['reference_size']} test images; "
        f"FID@{settings['n'] // settings['splits']}: mean ± SE over {settings['splits']} disjoint "
        "subsets; IS ± std/sqrt(10) over torch-fidelity's splits; accuracies ± binomial SE "
        "(holdout: `fmnist_classifier_holdout_tiny`, never used elsewhere here); ESS / N (mean "
        "over the steps), NFE (all N particles) and s / image ± std/sqrt(n) over the images "
        "(seconds: batch wall time shared by its images).",
        f"- {settings['platform']}, torch {settings['torch']}, {settings['threads']} thread(s); "
        f"wall {settings['wall_min']:.1f} min"
        + (" (parts run separately: the longest part)." if len(commands) > 1 else "."),
        "",
        f"| setting | N | NFE / image | FID (n={settings['n']}) | "
        f"FID@{settings['n'] // settings['splits']} | IS | KID x 1e3 | precision | recall | "
        "accuracy | holdout accuracy | ESS / N | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kid = f"{1e3 * r['kid']:.2f}" if "kid" in r else "—"
        lines.append(
            f"| {r['setting']} | {r.get('particles', '—')} | {r.get('nfe', 0):.0f} | "
            f"{fmt(r, 'fid')} | {fmt(r, 'fid_split')} | {fmt(r, 'isc')} | {kid} | "
            f"{fmt(r, 'precision', 3)} | {fmt(r, 'recall', 3)} | {fmt(r, 'accuracy', 3)} | "
            f"{fmt(r, 'holdout_accuracy', 3)} | {fmt(r, 'ess', 3)} | {fmt(r, 'seconds', 4)} |"
        )
    return "\n".join(lines) + "\n"


def row_order(row: dict) -> tuple:
    """The table's order: the real row, then by N, steps, weight (N = 1 ancestral first)."""
    if "particles" not in row:
        return (0,)
    tag = 0 if row.get("unmasking", "ancestral") == "ancestral" else 1
    return (1, row["particles"], tag, row["steps"], row["weight"])


def merge(parts: list[Path], out: Path, command: str) -> dict[str, Any]:
    """One table from the JSON records of runs on disjoint cells (same model, labels, seeds,
    reference and splits); a row present in two parts is an error, except the real row when
    identical."""
    records = [json.loads(Path(p).read_text()) for p in parts]
    first = records[0]["settings"]
    same = ("model", "n", "per_class", "splits", "reference_size", "seed")
    rows: dict[str, dict] = {}
    for record, path in zip(records, parts, strict=True):
        differ = [k for k in same if record["settings"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--merge: {path} differs from {parts[0]} in {differ}")
        for row in record["rows"]:
            if row["setting"] in rows and ("particles" in row or rows[row["setting"]] != row):
                raise ValueError(f"--merge: the row {row['setting']!r} appears in two parts")
            rows[row["setting"]] = row
            if "particles" in row:  # the part's grid, copied next to the merged table
                name = grid_name(row["weight"], row["steps"], row["particles"], row["unmasking"])
                grid, target = Path(path).parent / name, out / name
                if grid.is_file() and grid.resolve() != target.resolve():
                    out.mkdir(parents=True, exist_ok=True)
                    shutil.copy(grid, target)
    settings = {**first, "wall_min": max(r["settings"]["wall_min"] for r in records)}
    settings["part_wall_min"] = [r["settings"]["wall_min"] for r in records]
    settings["command"] = [c for r in records for c in _commands(r["settings"])] + [command]
    return write(out, sorted(rows.values(), key=row_order), settings)


def _commands(settings: dict) -> list[str]:
    command = settings["command"]
    return command if isinstance(command, list) else [command]


def write(out: Path, rows: list[dict], settings: dict) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "rows": rows}
    (out / "image_cfg_table.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "image_cfg_table.md").write_text(report(rows, settings))
    print((out / "image_cfg_table.md").read_text())
    return record


def csv_of(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: give comma-separated numbers, e.g. 1,8,16") from None
    if not values:
        raise SystemExit(f"{flag} {text!r}: give at least one value")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded_image")
    parser.add_argument("--weights", default="1.25,1.5", help="CFG weights (1 = no guidance)")
    parser.add_argument("--steps", default="8,32")
    parser.add_argument(
        "--particles", default="1",
        help="comma-separated N; N = 1: the plain CFG sampler, N > 1: SMC on the CFG target",
    )  # fmt: skip
    parser.add_argument(
        "--smc-unmasking", default="remdm", choices=["remdm", "ancestral"],
        help="unmasking of the N > 1 rows (remdm: as configs/methods/images/cfg_remdm.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--remdm-baseline", action="store_true",
        help="also N = 1 rows with the SMC rows' unmasking (isolates the effect of N)",
    )  # fmt: skip
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--data-root", default=DEFAULT_ROOT)
    parser.add_argument(
        "--reference-size", type=int, default=None, help="first K test images (default: all)"
    )
    parser.add_argument("--no-real", dest="real", action="store_false", help="skip the real row")
    parser.add_argument("--out", type=Path, default=Path("outputs/image_cfg_table"))
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="PART.json",
        help="join the image_cfg_table.json of runs on disjoint cells into --out",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the finished batches of an interrupted run with the same --out "
        "(OUT/blocks/<cell>/<first index>.pt; without --resume they are redone)",
    )  # fmt: skip
    parser.add_argument(
        "--diagnostic", action="store_true",
        help="instead of the table: what the weights select in each N > 1 cell "
        "(particle_diagnostic.{json,md} in --out)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    command = "python experiments/image_cfg_table.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.resume and (args.merge or args.diagnostic):
        parser.error(
            "--resume continues a table run; it has no effect with --merge or --diagnostic"
        )
    if args.merge:
        return merge(args.merge, args.out, command)
    if args.per_class < 1 or args.splits < 2 or args.batch_size < 1:
        parser.error("--per-class and --batch-size must be >= 1 and --splits >= 2")
    weights = csv_of(args.weights, float, "--weights")
    steps_list = csv_of(args.steps, int, "--steps")
    particles = csv_of(args.particles, int, "--particles")
    if min(particles) < 1 or min(steps_list) < 1:
        parser.error("--particles and --steps must be >= 1")
    if max(particles) > 1 and 1.0 in weights:
        parser.error("--weights 1 with --particles > 1: w = 1 has no product target to weigh")
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    model = load_image_model(args.model)
    if args.diagnostic:
        return diagnose(args, model, weights, steps_list, particles, command)
    test_images, test_labels = load_fashion_mnist(args.data_root, "test")
    reference = torch.from_numpy(test_images.copy()).unsqueeze(1)[: args.reference_size]  # uint8
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    n = len(labels)
    rows: list[dict[str, Any]] = []
    if args.real:  # the real data's own row: n training images (the same labels' counts)
        train_images, train_labels = load_fashion_mnist(args.data_root, "train")
        train_labels = torch.as_tensor(train_labels).long()
        pick = torch.cat(
            [(train_labels == c).nonzero().flatten()[: args.per_class] for c in range(10)]
        )
        real = torch.from_numpy(train_images[pick.numpy()].copy()).unsqueeze(1)
        rows.append(
            {
                "setting": f"real (train, n={n})",
                **scores(real, train_labels[pick], reference, args.splits),
            }
        )
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cells = []  # (N, unmasking or None for the default)
    for N in particles:
        cells.append((N, None if N == 1 else args.smc_unmasking))
    if args.remdm_baseline and args.smc_unmasking != "ancestral":
        cells.append((1, args.smc_unmasking))
    for N, unmasking in cells:
        for steps in steps_list:
            for weight in weights:
                method = cfg_method(weight, steps, model.null_class, N, unmasking)
                out = sample_blocks(
                    method, args.model, model, labels, args.seed, args.batch_size,
                    args.out / "blocks" / Path(grid_name(weight, steps, N, method.unmasking)).stem,
                    args.resume,
                )  # fmt: skip
                row = {
                    "setting": method.name,
                    "weight": weight,
                    "steps": steps,
                    "particles": N,
                    "unmasking": method.unmasking,
                    **sampler_cells(out),
                }
                row.update(scores(out.images, labels, reference, args.splits))
                rows.append(row)
                print(row, flush=True)
                # rows: the first samples of each class; columns: the classes
                k = min(10, args.per_class)
                index = torch.arange(model.num_classes) * args.per_class + torch.arange(
                    k
                ).unsqueeze(1)
                grid = image_grid(out.images[index.flatten()], nrow=model.num_classes)
                save_png(grid, args.out / grid_name(weight, steps, N, method.unmasking))
    settings = {
        "command": command,
        "model": args.model,
        "n": n,
        "per_class": args.per_class,
        "splits": args.splits,
        "reference_size": len(reference),
        "seed": args.seed,
        "smc_unmasking": args.smc_unmasking,
        "platform": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_min": (time.perf_counter() - start) / 60,
    }
    return write(args.out, rows, settings)


def diagnose(args, model, weights, steps_list, particles, command) -> dict[str, Any]:
    """``--diagnostic``: ``particle_diagnostic`` of every N > 1 cell."""
    if max(particles) < 2:
        raise SystemExit("--diagnostic looks at the weights of N > 1 cells: give --particles >= 2")
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    rows = []
    for N in [p for p in particles if p > 1]:
        for steps in steps_list:
            for weight in weights:
                method = cfg_method(weight, steps, model.null_class, N, args.smc_unmasking)
                row = {"setting": method.name, "weight": weight, "steps": steps}
                row.update(particle_diagnostic(model, method, labels, args.seed))
                rows.append(row)
                print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "seed": args.seed, "per_class": args.per_class, "rows": rows}
    (args.out / "particle_diagnostic.json").write_text(json.dumps(record, indent=1) + "\n")
    text = diagnostic_report(rows, command)
    (args.out / "particle_diagnostic.md").write_text(text)
    print(text)
    return record


BLOCK_FIELDS = (
    "labels",
    "tokens",
    "log_weights",
    "ess",
    "resampled",
    "sample_nfe",
    "sample_seconds",
)


def sample_blocks(
    method: Method,
    model_name: str,
    model: Any,
    labels: torch.Tensor,
    seed: int,
    batch_size: int,
    folder: Path,
    resume: bool,
) -> ImageSamples:
    """``sample_images`` one batch at a time, each finished batch written to
    ``folder/<first index>.pt`` (tmp + replace) so that an interrupted cell continues with
    ``resume``: a saved batch is reused when it was made by the same model, method, seed and
    labels (otherwise a ``ValueError`` names the file), and only the missing ones are sampled.
    Sample ``i`` is seeded by ``derive_seed(seed, i)`` wherever its batch runs, so the tokens are
    those of one uninterrupted run. Without ``resume`` the folder's batches are redone."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for lo in range(0, len(labels), batch_size):
        hi = min(lo + batch_size, len(labels))
        path = folder / f"{lo:06d}.pt"
        key = {"model": model_name, "method": method.name, "seed": seed, "first": lo,
               "labels": labels[lo:hi].tolist()}  # fmt: skip
        if resume and path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
            except Exception as err:  # a truncated or foreign file: name it and the fix
                raise ValueError(
                    f"{path} cannot be read as a saved batch ({err.__class__.__name__}): remove "
                    "it to sample that batch again"
                ) from err
            if saved["key"] != key:
                raise ValueError(
                    f"{path} holds another run's batch ({saved['key']['model']}, "
                    f"{saved['key']['method']!r}, seed {saved['key']['seed']}, "
                    f"{len(saved['key']['labels'])} labels from {saved['key']['first']}): remove "
                    f"{folder} or run without --resume"
                )
            fields = saved["fields"]
            parts.append(
                ImageSamples(name=method.name, images=None, nfe=float(fields["sample_nfe"].mean()),
                             seconds=float(fields["sample_seconds"].mean()), **fields)
            )  # fmt: skip
            print(f"reused {path} ({hi - lo} samples)", flush=True)
            continue
        block = sample_images(
            method, model, labels[lo:hi], seed=seed, batch_size=batch_size, offset=lo
        )
        fields = {f: getattr(block, f) for f in BLOCK_FIELDS}
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "fields": fields}, tmp)
        os.replace(tmp, path)
        parts.append(block)
    out = ImageSamples.concat(parts)
    images = model.decode(out.tokens).cpu() if model.vq is not None else None
    return dataclasses.replace(out, images=images)


def grid_name(weight: float, steps: int, particles: int, unmasking: str) -> str:
    """``grid_w<w>_s<steps>.png`` for the plain CFG sampler (the committed names), with
    ``_n<N>`` and the unmasking (other than ancestral) appended otherwise."""
    tail = "" if particles == 1 else f"_n{particles}"
    tail += "" if unmasking == "ancestral" else f"_{unmasking}"
    return f"grid_w{weight:g}_s{steps}{tail}.png"


if __name__ == "__main__":
    main()
