"""Sampler overhead: wall time of ``SMCSampler.sample`` / time spent inside the denoiser.

Denoisers (``--model``): ``embedded`` (default) is the project's own small transformer, the
committed MDLM DiT ``mdlm_tiny`` (vocab 4096, hidden 256, 4 blocks, 4 heads, L <= 128, ~5.7M
parameters), whose forward returns normalized SUBS log-probabilities (``outputs_log_probs``);
``tiny`` is a randomly initialised ``ls.TinyTransformerDenoiser`` of the same shape by default
(``--vocab-size``, ``--d-model``, ``--layers``), which returns raw logits that the sampler
normalizes itself (one more ``[B*N, L, V]`` pass per step, billed to the sampler).

The denoiser is wrapped in ``TimedDenoiser`` (an ``ls.Denoiser``: ``vocab_size``, ``mask_id``,
``__call__``) that accumulates ``time.perf_counter`` around every forward call (with
``torch.cuda.synchronize`` before and after on CUDA, so queued sampler kernels are not billed
to the network). The **overhead ratio** is ``wall / forward``: 1.00 is the physical limit (the
sampler costs nothing beyond the network), the target is <= 1.05.

Configurations (``B`` prompts, ``N`` particles, ``T`` steps, ``L`` length):

1. ``ancestral``     plain MDLM ancestral sampling, ``N = 1``, no potential;
2. ``sr-smc``        SR-SMC, ``N`` particles, ``low_confidence`` unmasking, ``SelfReward()``,
                     ESS-adaptive resampling (the default ``ess:0.5``);
3. ``sr-smc-block``  the same inside semi-autoregressive blocks of ``block_length`` with
                     ``resample_when="block:0.5"`` (SR-SMC's per-block rule).

Each configuration gets one warm-up run and then ``--repeats`` timed runs; the table shows
the medians. Run ``python benchmarks/sampler_overhead.py --help`` for the flags; ``--quick``
uses tiny sizes (a smoke run of a few seconds), ``--profile`` prints a cProfile summary of
one extra run per configuration and ``--digest`` prints a SHA-256 of every timed run's outputs
(tokens, log-weights, log Ẑ, ESS, resampled, ancestors) so that two versions of the sampler
can be checked for bit-identical results at benchmark scale, e.g.
``PYTHONPATH=<old checkout> python benchmarks/sampler_overhead.py --digest`` against the same
command on the new one (same ``--threads``: CPU kernels may round differently).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import math
import platform
import pstats
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import lightning_smc as ls
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_smc as ls

__all__ = [
    "CONFIGS",
    "MODELS",
    "Sizes",
    "TimedDenoiser",
    "build_model",
    "main",
    "run_benchmark",
    "run_config",
]


@dataclass
class Sizes:
    """Model and run sizes. Defaults: a small but real text denoiser (~6M parameters)."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    steps: int = 32
    batch: int = 2
    particles: int = 16
    block_length: int = 32


QUICK = Sizes(
    vocab_size=64,
    d_model=32,
    n_layers=1,
    n_heads=2,
    seq_len=16,
    steps=4,
    batch=2,
    particles=4,
    block_length=8,
)


class TimedDenoiser:
    """An ``ls.Denoiser`` that forwards to ``inner`` and accumulates the time spent in it."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.mask_id = inner.mask_id
        self.outputs_log_probs = bool(getattr(inner, "outputs_log_probs", False))
        self.seconds = 0.0
        self.calls = 0
        self._cuda = (
            any(p.is_cuda for p in inner.parameters()) if hasattr(inner, "parameters") else False
        )

    def parameters(self):  # lets the sampler infer the device
        return self.inner.parameters()

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __call__(self, x_t, t, cond=None):
        if self._cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = self.inner(x_t, t, cond)
        if self._cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return logits


def _sampler_kwargs(name: str, sizes: Sizes) -> dict[str, Any]:
    if name == "ancestral":
        return dict(num_particles=1, unmasking="ancestral", potential=None)
    smc = dict(num_particles=sizes.particles, unmasking="low_confidence", potential=ls.SelfReward())
    if name == "sr-smc":
        return smc
    if name == "sr-smc-block":
        return dict(smc, block_length=sizes.block_length, resample_when="block:0.5")
    raise ValueError(f"unknown config {name!r}; choose from {CONFIGS}")


CONFIGS = ("ancestral", "sr-smc", "sr-smc-block")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(
    name: str,
    denoiser: TimedDenoiser,
    sizes: Sizes,
    device: torch.device,
    repeats: int,
    profile: bool = False,
    digest: bool = False,
) -> dict[str, Any]:
    """One warm-up run and ``repeats`` timed runs of one configuration."""
    sampler = ls.SMCSampler(denoiser, num_steps=sizes.steps, **_sampler_kwargs(name, sizes))

    digests: list[str] = []

    def once(seed: int) -> tuple[float, float, float, int]:
        denoiser.reset()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        _sync(device)
        start = time.perf_counter()
        out = sampler.sample(
            seq_len=sizes.seq_len, batch_size=sizes.batch, generator=generator, device=device
        )
        _sync(device)
        wall = time.perf_counter() - start
        if digest:
            digests.append(output_digest(out))
        return wall, denoiser.seconds, float(out.nfe), int(out.resampled.sum())

    once(0)  # warm-up
    digests.clear()
    walls, forwards, ratios = [], [], []
    for r in range(repeats):
        wall, fwd, nfe, resamples = once(r + 1)
        walls.append(wall)
        forwards.append(fwd)
        ratios.append(wall / fwd if fwd > 0 else math.inf)
    timed_digests = list(digests)
    result = {
        "config": name,
        "wall_s": statistics.median(walls),
        "forward_s": statistics.median(forwards),
        "ratio": statistics.median(ratios),
        "nfe": nfe,
        "forward_calls": denoiser.calls,
        "resamples": resamples,
        "rows": sizes.batch * (1 if name == "ancestral" else sizes.particles),
        "walls_s": walls,
        "forwards_s": forwards,
        "ratios": ratios,
    }
    result["overhead_ms_per_step"] = 1e3 * (result["wall_s"] - result["forward_s"]) / sizes.steps
    if digest:
        result["digests"] = timed_digests  # one per timed run (seeds 1..repeats)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        once(repeats + 1)
        prof.disable()
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(25)
        result["profile"] = stream.getvalue()
    return result


def output_digest(out: Any) -> str:
    """SHA-256 of the exact bytes of a sampler output (shapes and dtypes included)."""
    h = hashlib.sha256()
    for t in (
        out.tokens,
        out.log_weights,
        out.log_normalizer,
        out.ess,
        out.resampled,
        out.ancestors,
    ):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes())
    return h.hexdigest()


MODELS = ("embedded", "tiny")


def build_model(model: str, sizes: Sizes, seed: int = 0):
    """The denoiser of ``--model``; for ``embedded`` the sizes are the checkpoint's (written
    back into ``sizes``)."""
    if model == "embedded":
        from lightning_smc.models.loading import load_model

        denoiser, _ = load_model("embedded")
        config = denoiser.config
        if sizes.seq_len > config.model_length:
            raise SystemExit(
                f"--seq-len {sizes.seq_len} exceeds the embedded model's model_length "
                f"{config.model_length}"
            )
        sizes.vocab_size, sizes.d_model = config.vocab_size, config.hidden_dim
        sizes.n_layers, sizes.n_heads = config.n_blocks, config.n_heads
        return denoiser
    if model != "tiny":
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    torch.manual_seed(seed)
    return ls.TinyTransformerDenoiser(
        sizes.vocab_size,
        max_len=sizes.seq_len,
        d_model=sizes.d_model,
        n_layers=sizes.n_layers,
        n_heads=sizes.n_heads,
    )


def run_benchmark(
    sizes: Sizes,
    device: str = "cpu",
    repeats: int = 3,
    configs=CONFIGS,
    profile: bool = False,
    seed: int = 0,
    digest: bool = False,
    model: str = "tiny",
    module: Any = None,
) -> dict[str, Any]:
    """Build the denoiser (or take ``module``, built by ``build_model(model, ...)``) and time
    every configuration; returns a JSON-ready dict."""
    device = torch.device(device)
    model_name = model
    if module is None:
        module = build_model(model_name, sizes, seed)
    model = module.to(device).eval()
    denoiser = TimedDenoiser(model)
    results = {
        name: run_config(name, denoiser, sizes, device, repeats, profile, digest)
        for name in configs
    }
    return {
        "model": model_name,
        "outputs_log_probs": denoiser.outputs_log_probs,
        "sizes": asdict(sizes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "configs": results,
    }


def format_table(report: dict[str, Any]) -> str:
    header = f"{'config':<14} {'wall s':>8} {'forward s':>10} {'overhead':>9} {'NFE':>6} {'rows':>5} {'resamples':>9} {'non-fwd ms/step':>15}"
    lines = [header, "-" * len(header)]
    for r in report["configs"].values():
        lines.append(
            f"{r['config']:<14} {r['wall_s']:>8.3f} {r['forward_s']:>10.3f} {r['ratio']:>9.3f} {r['nfe']:>6g} "
            f"{r['rows']:>5d} {r['resamples']:>9d} {r['overhead_ms_per_step']:>15.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="embedded",
        help="embedded: the committed MDLM DiT (log-prob outputs); tiny: a random "
        "TinyTransformerDenoiser (raw logits) sized by --vocab-size/--d-model/--layers "
        "(default: embedded; --quick implies tiny)",
    )
    p.add_argument("--steps", type=int, help=f"reverse steps T (default {Sizes.steps})")
    p.add_argument("--seq-len", type=int, help=f"sequence length L (default {Sizes.seq_len})")
    p.add_argument("--batch", type=int, help=f"prompts B per sample() call (default {Sizes.batch})")
    p.add_argument(
        "--particles", type=int, help=f"particles N for the SMC configs (default {Sizes.particles})"
    )
    p.add_argument(
        "--block-length",
        type=int,
        help=f"block length of sr-smc-block (default {Sizes.block_length})",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        help=f"denoiser vocabulary incl. mask (default {Sizes.vocab_size})",
    )
    p.add_argument("--d-model", type=int, help=f"denoiser width (default {Sizes.d_model})")
    p.add_argument(
        "--layers", type=int, dest="n_layers", help=f"denoiser layers (default {Sizes.n_layers})"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per config after one warm-up; the median is shown (default 3)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="which configs to run"
    )
    p.add_argument(
        "--digest",
        action="store_true",
        help="print a SHA-256 of each timed run's outputs (to compare sampler versions)",
    )
    p.add_argument("--json", type=Path, help="write the results (incl. every repeat) to this file")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes for a smoke run of a few seconds"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print a cProfile summary (by own time) of one extra run per config",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    sizes = Sizes(**asdict(QUICK)) if args.quick else Sizes()
    model = "tiny" if args.quick else args.model
    tiny_flags = {"vocab_size": "--vocab-size", "d_model": "--d-model", "n_layers": "--layers"}
    shaped = [flag for field, flag in tiny_flags.items() if getattr(args, field) is not None]
    if model == "embedded" and shaped:
        raise SystemExit(
            f"{shaped[0]} sizes the tiny model; the embedded model has its own sizes "
            "(add --model tiny)"
        )
    for field in (
        "steps",
        "seq_len",
        "batch",
        "particles",
        "block_length",
        "vocab_size",
        "d_model",
        "n_layers",
    ):
        if getattr(args, field) is not None:
            setattr(sizes, field, getattr(args, field))
    module = build_model(model, sizes)  # (the embedded model writes its sizes into sizes)
    name = "embedded MDLM (mdlm_tiny)" if model == "embedded" else "TinyTransformerDenoiser"
    print(
        f"{name}: vocab_size={sizes.vocab_size} d_model={sizes.d_model} layers={sizes.n_layers} "
        f"heads={sizes.n_heads}; seq_len={sizes.seq_len} steps={sizes.steps} batch={sizes.batch} "
        f"particles={sizes.particles} block_length={sizes.block_length}; device={args.device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} (median shown)",
        flush=True,
    )
    report = run_benchmark(
        sizes,
        args.device,
        args.repeats,
        args.configs,
        args.profile,
        digest=args.digest,
        model=model,
        module=module,
    )
    print(f"parameters: {report['parameters'] / 1e6:.2f}M")
    print(format_table(report))
    print("overhead = wall / forward (1.00 = no sampler cost; target <= 1.05)")
    if args.digest:
        print("output SHA-256 per timed run (seeds 1..repeats):")
        for r in report["configs"].values():
            print(f"  {r['config']:<14} " + " ".join(d[:16] for d in r["digests"]))
    if args.profile:
        for r in report["configs"].values():
            print(
                f"\n=== cProfile: {r['config']} (one run, sorted by own time) ===\n{r['profile']}"
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
