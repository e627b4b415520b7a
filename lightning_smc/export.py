"""``python -m lightning_smc.export``: a Lightning checkpoint -> a Hugging Face directory.

(For an ``AmortizedProposalModule`` run: the adapter folder, peft format plus ``F_psi``, as
its ``on_fit_end`` writes it, from any intermediate checkpoint.)

    python -m lightning_smc.export --config outputs/mdlm_tiny/config.yaml \\
        --ckpt outputs/mdlm_tiny/checkpoints/last.ckpt --out lightning_smc/assets/mdlm_tiny

Rebuilds the run's denoiser and data module from the resolved ``config.yaml`` that ``fit``
saved, loads the checkpoint's ``state_dict`` (with ``EMAWeightAveraging`` that is the EMA
average; ``--raw`` takes the un-averaged ``current_model_state`` instead) and writes
``save_pretrained`` output plus the data module's tokenizer. ``fit`` does the same at the end
of a run; this command exports any intermediate checkpoint. The checkpoint is read with
``torch.load(weights_only=True)``: a file whose pickle would run code is refused.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
from pathlib import Path
from typing import Any

import yaml

from .models.loading import read_checkpoint
from .models.tokenizer import save_tokenizer

__all__ = ["build", "export", "main"]


def build(spec: dict[str, Any]) -> Any:
    """Instantiate a ``{"class_path": ..., "init_args": {...}}`` node (nested nodes too)."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not isinstance(cls, type):
        raise TypeError(f"class_path {spec['class_path']!r} is not a class")
    args = {
        k: build(v) if isinstance(v, dict) and "class_path" in v else v
        for k, v in (spec.get("init_args") or {}).items()
    }
    return cls(**args)


def _node(cfg: Any, config: Path, *keys: str) -> dict[str, Any]:
    node = cfg
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or "class_path" not in node:
        raise ValueError(
            f"{config} has no {'.'.join(keys)} with a class_path: pass the config.yaml that "
            "fit saved beside the checkpoints"
        )
    return node


def export(config: Path, ckpt: Path, out: Path, raw: bool = False) -> Path:
    """Write ``ckpt``'s denoiser (rebuilt from ``config``) and tokenizer to ``out``.

    The checkpoint is read with ``weights_only=True`` (tensors and plain containers: a
    checkpoint that would run code is refused); every error names the file at fault.
    """
    config, ckpt = Path(config), Path(ckpt)
    if not config.is_file():
        raise FileNotFoundError(f"--config {config}: no such file (the config.yaml fit saved)")
    try:
        cfg = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {config} is not valid YAML: {err}") from None
    amortized = str(_node(cfg, config, "model").get("class_path", "")).endswith(
        "AmortizedProposalModule"
    )
    if not amortized:
        denoiser_node = _node(cfg, config, "model", "init_args", "denoiser")
        data_node = _node(cfg, config, "data")
    state = read_checkpoint(ckpt)
    key = "current_model_state" if raw else "state_dict"
    if not isinstance(state, dict) or not isinstance(state.get(key), dict):
        raise ValueError(
            f"--ckpt {ckpt} has no {key!r}"
            + (" (raw weights exist only with EMAWeightAveraging)" if raw else "")
            + ": pass a checkpoint written by fit"
        )
    if state.get("global_step", 1) == 0:
        raise ValueError(
            f"--ckpt {ckpt} was saved before the first optimizer step (global_step=0): its "
            "weights are the random initialization, not a trained denoiser; nothing exported"
        )
    if amortized:
        return _export_adapter(cfg["model"], state[key], ckpt, config, out)
    weights = {k[len("denoiser.") :]: v for k, v in state[key].items() if k.startswith("denoiser.")}
    denoiser = build(denoiser_node)
    try:
        denoiser.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"--ckpt {ckpt}: its denoiser weights do not fit the denoiser of --config {config}: "
            f"{err}"
        ) from None
    denoiser.save_pretrained(out)
    save_tokenizer(build(data_node).tokenizer, out)
    return Path(out)


def _export_adapter(node: dict, weights: dict, ckpt: Path, config: Path, out: Path) -> Path:
    """An ``AmortizedProposalModule`` checkpoint -> its adapter folder (``save_adapter``)."""
    from .methods import RewardTiltSpec

    args = dict(node.get("init_args") or {})
    potential = args.get("potential")
    if isinstance(potential, dict) and "class_path" not in potential:  # plain fields
        args["potential"] = RewardTiltSpec(**potential)
    # init_adapter stays: its adapter_config.json gives the LoRA structure (rank, targets) the
    # checkpoint's weights fit; the weights themselves are then the checkpoint's
    module = build({"class_path": node["class_path"], "init_args": args})
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"--ckpt {ckpt}: its weights do not fit the module of --config {config}: {err}"
        ) from None
    return module.save_adapter(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="config.yaml saved by fit")
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    args = parser.parse_args(argv)
    try:
        out = export(args.config, args.ckpt, args.out, args.raw)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
