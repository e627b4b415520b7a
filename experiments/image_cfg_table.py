"""The seed's MaskGIT table shape on the embedded image model (issue 14): FID / IS / class accuracy
of class-conditional samples for CFG weight x steps with the plain sampler (N = 1), plus the real
data's own values as the reference row.

CFG is the product target ``p(x | y)^w p(x | null)^(1 - w)`` per position (Meissonic's guidance
scale ``w``: logits ``u + w (c - u)``), proposed from the normalized mixture (one particle: the
usual CFG sampler). Every cell uses the same labels (``--per-class`` per class, in class order)
and the same seeds (sample ``i`` from ``derive_seed(seed, i)``).

Metrics (``lightning_smc.metrics.image``, torch-fidelity, offline) with the project's
Fashion-MNIST classifier as the feature extractor ("domain" FID / IS / KID / precision /
recall), against the official test split (10,000 images); class accuracy by the same classifier
and by the holdout classifier (another architecture and seed). Standard errors: accuracy
``sqrt(p (1 - p) / n)``; IS: torch-fidelity's std over its 10 splits / sqrt(10); FID: the
spread of FID over ``--splits`` disjoint subsets of the samples (FID at ``n / splits`` images,
mean ± SE; FID is biased upwards at small ``n``, so compare it only with the same column).

    python experiments/image_cfg_table.py --model embedded_image --per-class 100 \
        --out experiments/results/image_cfg_table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_smc.data.images import DEFAULT_ROOT, load_fashion_mnist
from lightning_smc.evaluation.images import image_grid, sample_images, save_png
from lightning_smc.methods import Method, ProductTargetSpec
from lightning_smc.metrics.image import class_accuracy, image_metrics
from lightning_smc.models.image import load_image_model

HOLDOUT = "fmnist_classifier_holdout_tiny"


def cfg_method(weight: float, steps: int, null_class: int) -> Method:
    potential = None if weight == 1.0 else ProductTargetSpec(weight=weight, second_cond=null_class)
    return Method(
        name=f"CFG {weight:g}, {steps} steps",
        num_particles=1,
        num_steps=steps,
        unmasking="ancestral",
        schedule="maskgit_cosine",
        potential=potential,
    )


def scores(
    images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, splits: int
) -> dict:
    """Domain FID / IS / KID / PRC on all images, FID per split, accuracies with SEs."""
    n = len(images)
    out = image_metrics(images, reference, reference_name=f"fmnist-test-{len(reference)}")
    out["isc_se"] = out.pop("isc_std") / math.sqrt(10)
    per_split = []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for part in order.chunk(splits):
        per_split.append(
            image_metrics(
                images[part], reference, ("fid",), reference_name=f"fmnist-test-{len(reference)}"
            )["fid"]
        )
    values = torch.tensor(per_split, dtype=torch.float64)
    out["fid_split"] = float(values.mean())
    out["fid_split_se"] = float(values.std() / math.sqrt(len(values)))
    for key, clf in (("accuracy", None), ("holdout_accuracy", HOLDOUT)):
        acc = class_accuracy(images, labels) if clf is None else class_accuracy(images, labels, clf)
        out[key], out[f"{key}_se"] = acc, math.sqrt(acc * (1 - acc) / n)
    out["n"] = n
    return out


def fmt(row: dict, key: str, digits: int = 2) -> str:
    if key not in row:
        return "—"
    se = row.get(f"{key}_se")
    return f"{row[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def report(rows: list[dict], settings: dict) -> str:
    lines = [
        "# CFG x steps on the embedded image model (plain sampler, N = 1)",
        "",
        f"`{settings['command']}`",
        "",
        f"- model: {settings['model']}; {settings['n']} samples per cell ({settings['per_class']} per "
        "class, the same labels and seeds in every cell); MaskGIT cosine schedule, ancestral "
        "unmasking; CFG weight w as Meissonic's guidance scale (logits u + w (c - u)); w = 1 is "
        "the conditional model alone.",
        "- domain metrics: torch-fidelity with the project's Fashion-MNIST classifier "
        "(`fmnist_classifier_tiny`) as feature extractor, reference = the first "
        f"{settings['reference_size']} test images; "
        f"FID@{settings['n'] // settings['splits']}: mean ± SE over {settings['splits']} disjoint "
        "subsets; IS ± std/sqrt(10) over torch-fidelity's splits; accuracies ± binomial SE "
        "(holdout: `fmnist_classifier_holdout_tiny`, never used elsewhere here).",
        f"- {settings['platform']}, torch {settings['torch']}, {settings['threads']} thread(s); "
        f"wall {settings['wall_min']:.1f} min.",
        "",
        f"| setting | NFE / image | FID (n={settings['n']}) | FID@{settings['n'] // settings['splits']} "
        "| IS | KID x 1e3 | precision | recall | accuracy | holdout accuracy | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kid = f"{1e3 * r['kid']:.2f}" if "kid" in r else "—"
        lines.append(
            f"| {r['setting']} | {r.get('nfe', 0):.0f} | {fmt(r, 'fid')} | {fmt(r, 'fid_split')} | "
            f"{fmt(r, 'isc')} | {kid} | {fmt(r, 'precision', 3)} | {fmt(r, 'recall', 3)} | "
            f"{fmt(r, 'accuracy', 3)} | {fmt(r, 'holdout_accuracy', 3)} | "
            f"{r.get('seconds', 0):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded_image")
    parser.add_argument("--weights", default="1.25,1.5", help="CFG weights (1 = no guidance)")
    parser.add_argument("--steps", default="8,32")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--data-root", default=DEFAULT_ROOT)
    parser.add_argument(
        "--reference-size", type=int, default=None, help="first K test images (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/image_cfg_table"))
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.splits < 2:
        parser.error("--per-class must be >= 1 and --splits >= 2")
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    model = load_image_model(args.model)
    test_images, test_labels = load_fashion_mnist(args.data_root, "test")
    reference = torch.from_numpy(test_images.copy()).unsqueeze(1)[: args.reference_size]  # uint8
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    n = len(labels)
    rows: list[dict[str, Any]] = []
    # the real data's own row: n training images (the same labels' counts) against the test set
    train_images, train_labels = load_fashion_mnist(args.data_root, "train")
    train_labels = torch.as_tensor(train_labels).long()
    pick = torch.cat([(train_labels == c).nonzero().flatten()[: args.per_class] for c in range(10)])
    real = torch.from_numpy(train_images[pick.numpy()].copy()).unsqueeze(1)
    rows.append(
        {
            "setting": f"real (train, n={n})",
            **scores(real, train_labels[pick], reference, args.splits),
        }
    )
    print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for steps in [int(s) for s in args.steps.split(",")]:
        for weight in [float(w) for w in args.weights.split(",")]:
            method = cfg_method(weight, steps, model.null_class)
            out = sample_images(method, model, labels, seed=args.seed, batch_size=args.batch_size)
            row = {"setting": method.name, "nfe": out.nfe, "seconds": out.seconds}
            row.update(scores(out.images, labels, reference, args.splits))
            rows.append(row)
            print(row, flush=True)
            # rows: the first samples of each class; columns: the classes
            k = min(10, args.per_class)
            index = torch.arange(model.num_classes) * args.per_class + torch.arange(k).unsqueeze(1)
            grid = image_grid(out.images[index.flatten()], nrow=model.num_classes)
            save_png(grid, args.out / f"grid_w{weight:g}_s{steps}.png")
    settings = {
        "command": "python experiments/image_cfg_table.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "n": n,
        "per_class": args.per_class,
        "splits": args.splits,
        "reference_size": len(reference),
        "seed": args.seed,
        "platform": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_min": (time.perf_counter() - start) / 60,
    }
    (args.out / "image_cfg_table.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n"
    )
    (args.out / "image_cfg_table.md").write_text(report(rows, settings))
    print((args.out / "image_cfg_table.md").read_text())


if __name__ == "__main__":
    main()
