"""``python -m lightning_smc.export``: a Lightning checkpoint -> a Hugging Face directory.

    python -m lightning_smc.export --config outputs/mdlm_tiny/config.yaml \\
        --ckpt outputs/mdlm_tiny/checkpoints/last.ckpt --out lightning_smc/assets/mdlm_tiny

Rebuilds the run's denoiser and data module from the resolved ``config.yaml`` that ``fit``
saved, loads the checkpoint's ``state_dict`` (with ``EMAWeightAveraging`` that is the EMA
average; ``--raw`` takes the un-averaged ``current_model_state`` instead) and writes
``save_pretrained`` output plus the data module's tokenizer. ``fit`` does the same at the end
of a run; this command exports any intermediate checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import torch
import yaml

from .models.tokenizer import save_tokenizer

__all__ = ["build", "export", "main"]


def build(spec: dict[str, Any]) -> Any:
    """Instantiate a ``{"class_path": ..., "init_args": {...}}`` node (nested nodes too)."""
    module, _, name = spec["class_path"].rpartition(".")
    args = {
        k: build(v) if isinstance(v, dict) and "class_path" in v else v
        for k, v in (spec.get("init_args") or {}).items()
    }
    return getattr(importlib.import_module(module), name)(**args)


def export(config: Path, ckpt: Path, out: Path, raw: bool = False) -> Path:
    cfg = yaml.safe_load(Path(config).read_text())
    denoiser = build(cfg["model"]["init_args"]["denoiser"])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    key = "current_model_state" if raw else "state_dict"
    if key not in state:
        raise KeyError(
            f"--ckpt {ckpt} has no {key!r} (raw weights exist only with EMAWeightAveraging)"
        )
    weights = {k[len("denoiser.") :]: v for k, v in state[key].items() if k.startswith("denoiser.")}
    denoiser.load_state_dict(weights, strict=True)
    denoiser.save_pretrained(out)
    save_tokenizer(build(cfg["data"]).tokenizer, out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="config.yaml saved by fit")
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    args = parser.parse_args(argv)
    print(f"exported to {export(args.config, args.ckpt, args.out, args.raw)}")


if __name__ == "__main__":
    main()
