"""Train a Fashion-MNIST classifier asset (``lightning_smc.metrics.classifier``): the domain
feature extractor of the image metrics (``--preset tiny``) or the holdout scorer (``--preset
holdout``). One epoch by default; writes the folder ``load_classifier`` reads, with its card
numbers in the config.

    python experiments/train_fmnist_classifier.py --preset tiny --out lightning_smc/assets/fmnist_classifier_tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_smc.data.images import DEFAULT_ROOT, FashionMNISTDataModule
from lightning_smc.metrics.classifier import PRESETS, evaluate_accuracy, train_classifier


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a Fashion-MNIST classifier asset.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="folder to write (save_pretrained)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of the idx files")
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch")
    parser.add_argument("--seed", type=int, default=None, help="default: the preset's")
    args = parser.parse_args(argv)
    config, seed = PRESETS[args.preset]
    seed = seed if args.seed is None else args.seed
    dm = FashionMNISTDataModule(root=args.root, seed=0)
    train, test = dm.split("train"), dm.split("test")
    x_train, y_train = train.uint8_images().float() / 255, torch.from_numpy(train.labels.copy())
    x_test, y_test = test.uint8_images().float() / 255, torch.from_numpy(test.labels.copy())
    start = time.perf_counter()
    model = train_classifier(config, x_train, y_train, steps=args.steps, seed=seed)
    minutes = (time.perf_counter() - start) / 60
    card = {
        "preset": args.preset,
        "seed": seed,
        "steps": args.steps or len(y_train) // 64,
        "batch_size": 64,
        "train_images": len(y_train),
        "wall_minutes": round(minutes, 2),
        "test_accuracy": evaluate_accuracy(model, x_test, y_test),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(args.out, card)
    print(json.dumps(card))


if __name__ == "__main__":
    main()
