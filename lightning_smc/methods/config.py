"""Method config files (``configs/methods/**.yaml``): ``MethodConfig`` and ``load_method_config``.

A file holds a ``method:`` block (a ``Method``), the ``model`` and its ``tokenizer``, the
``reward`` / ``holdout`` / ``guide`` scorers (``class_path`` / ``init_args``), ``prompts``,
``seq_len``, ``num_samples``, ``batch_size`` and ``seed``; command-line style overrides
(``--method.num_particles 4``) win. Running one is ``lightning_smc.evaluation``'s job. A
method in the old spelling is refused with its rewrite (``rewrite_legacy``). Example::

    config = load_method_config("configs/methods/embedded/smc_base.yaml", ["--seed", "1"])
    config.method.potential  # RewardTiltSpec(alpha=0.1, schedule='linear', num_samples=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..rewards import BaseReward
from .method import Method
from .specs import SPECS, PotentialSpec

__all__ = [
    "LEGACY_KEYS",
    "MethodConfig",
    "legacy_error",
    "load_method_config",
    "method_parser",
    "rewrite_legacy",
]


# ------------------------------------------------------------------------ config files
@dataclass
class MethodConfig:
    """A method config file (``configs/methods/**.yaml``), parsed and instantiated.

    Keys: ``method`` (a ``Method``), ``model`` (checkpoint folder, ``embedded`` or a hub id in
    the mdlm-owt format) and its ``tokenizer``, ``reward``, ``holdout`` (a *different* scorer,
    reported, never steered on) and ``guide`` (``class_path`` / ``init_args``), ``prompts`` (a
    file, one prompt a line; none: unconditional), ``seq_len``, ``num_samples`` (answers
    without a prompt file), ``batch_size`` (prompts per sampler call) and ``seed``."""

    method: Method
    model: str
    reward: Any
    holdout: Any
    guide: Any
    tokenizer: str | None
    prompts: str | None
    seq_len: int
    num_samples: int
    batch_size: int
    seed: int
    task: str | None = None
    limit: int | None = None
    gen_length: int = 256
    chat: bool = False
    dtype: str | None = None


#: the method-config keys beside ``method``, with their docs
RUN_HELP = {
    "model": "the denoiser: embedded (the packaged Shakespeare MDLM), a save_pretrained folder "
    "or a hub id in the mdlm-owt format",
    "tokenizer": "its tokenizer (default: the one saved with the model)",
    "reward": "the target's reward (class_path / init_args of a lightning_smc.rewards class)",
    "holdout": "a different scorer, reported, never steered on",
    "guide": "a differentiable reward whose gradient drives a gradient proposal",
    "prompts": "a text file, one prompt a line (a blank line: an empty prefix); default: none",
    "seq_len": "tokens per answer, prompt included",
    "num_samples": "answers to draw when there is no prompt file",
    "batch_size": "prompts per sampler call (answers do not depend on it)",
    "seed": "prompt i is sampled with the generator seeded by derive_seed(seed, i)",
    "task": "a reasoning benchmark (gsm8k, math500, humaneval, mbpp): its few-shot prompts are "
    "completed and scored (samples.jsonl, summary.json with accuracy +- SE); needs an LLaDA / "
    "Dream model",
    "limit": "the first LIMIT problems of the task (default: all)",
    "gen_length": "tokens generated after each prompt (with task)",
    "chat": "wrap each task prompt in the tokenizer's chat template (with task)",
    "dtype": "weights of an LLaDA / Dream model, e.g. bfloat16 (default: the checkpoint's)",
}
_KEYS = {
    "model": (str, "embedded"),
    "reward": (BaseReward | None, None),
    "holdout": (BaseReward | None, None),
    "guide": (BaseReward | None, None),
    "tokenizer": (str | None, None),
    "prompts": (str | None, None),
    "seq_len": (int, 64),
    "num_samples": (int, 16),
    "batch_size": (int, 16),
    "seed": (int, 0),
    "task": (str | None, None),
    "limit": (int | None, None),
    "gen_length": (int, 256),
    "chat": (bool, False),
    "dtype": (str | None, None),
}


def method_parser():
    """The jsonargparse parser of method config files (``--config FILE`` plus overrides)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning_smc.sample", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a method YAML file")
    parser.add_class_arguments(Method, "method")
    for key, (kind, default) in _KEYS.items():
        parser.add_argument(f"--{key}", type=kind, default=default, help=RUN_HELP[key])
    return parser


#: keys of the old method spelling -> (spec name, the spec field it became)
LEGACY_KEYS = {
    "alpha": ("tilt", "alpha"),
    "twist_schedule": ("tilt", "schedule"),
    "twist_samples": ("tilt", "num_samples"),
    "beta": ("self_reward", "beta"),
    "gradient_tau": ("gradient", "tau"),
    "adapter": ("amortized", "adapter"),
}


def rewrite_legacy(method: dict[str, Any]) -> dict[str, Any] | None:
    """The new spelling of a ``method:`` block written in the old one (``None`` if it is not):
    ``potential: tilt`` + ``alpha`` / ``twist_schedule`` / ``twist_samples`` ->
    ``potential: {class_path: RewardTiltSpec, init_args: {alpha, schedule, num_samples}}``,
    ``proposal: gradient`` + ``gradient_tau`` -> ``GradientProposalSpec(tau)``, ``proposal:
    amortized`` + ``adapter`` -> ``DenoiserProposalSpec(adapter)``, ``none`` / ``base`` -> left out."""
    roles = {"potential": method.get("potential"), "proposal": method.get("proposal")}
    old_names = {role: v for role, v in roles.items() if v in ("none", "base")}
    old_keys = [k for k in LEGACY_KEYS if k in method]
    if not old_keys and not old_names:
        return None
    new = {k: v for k, v in method.items() if k not in LEGACY_KEYS and k not in old_names}
    named = {v for v in roles.values() if isinstance(v, str) and v in SPECS}
    for name in named | {LEGACY_KEYS[k][0] for k in old_keys}:  # a spec named or implied
        spec = SPECS[name]
        role = "potential" if issubclass(spec, PotentialSpec) else "proposal"
        args = {f: method[k] for k, (n, f) in LEGACY_KEYS.items() if n == name and k in method}
        new[role] = {"class_path": spec.__name__, "init_args": args}
    return new


def legacy_error(where: str, method: dict[str, Any]) -> ValueError | None:
    new = rewrite_legacy(method)
    if new is None:
        return None
    import yaml

    old = [k for k in LEGACY_KEYS if k in method] + [
        f"{role}: {method[role]}"
        for role in ("potential", "proposal")
        if method.get(role) in ("none", "base")
    ]
    block = yaml.safe_dump({"method": new}, sort_keys=False, default_flow_style=None).rstrip()
    return ValueError(
        f"{where}: {', '.join(map(str, old))} is the old method spelling; a method now names the "
        "classes it builds with their own arguments (lightning_smc/methods/). Rewrite it as:\n"
        + block
    )


def _method_overrides(overrides: list[str]) -> dict[str, Any]:
    """``--method.KEY VALUE`` pairs of ``overrides`` as ``{KEY: VALUE}`` (for the legacy check)."""
    out = {}
    for i, arg in enumerate(overrides):
        if arg.startswith("--method.") and "." not in arg[len("--method.") :].split("=")[0]:
            key, joined, value = arg[len("--method.") :].partition("=")
            if not joined:
                value = overrides[i + 1] if i + 1 < len(overrides) else None
            out[key] = value
    return out


def load_method_config(path: str | Path | None = None, overrides: list[str] = ()) -> MethodConfig:
    """Parse ``path`` (plus command-line style ``overrides``) into a ``MethodConfig``. A method
    in the old spelling is an error that shows its rewrite."""
    import yaml

    overrides = list(overrides)
    if path is not None and Path(path).is_file():
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        err = legacy_error(f"method config {path}", loaded.get("method") or {})
        if err is not None:
            raise err
    err = legacy_error("method overrides", _method_overrides(overrides))
    if err is not None:
        raise err
    parser = method_parser()
    args = (["--config", str(path)] if path is not None else []) + overrides
    try:
        config = parser.instantiate(parser.parse_args(args))
    except Exception as err:  # jsonargparse reports the offending key; keep its message
        raise ValueError(f"method config {path}: {err}") from err
    for key in ("seq_len", "num_samples", "batch_size", "gen_length"):
        if config[key] < 1:
            raise ValueError(f"method config {path}: {key} must be >= 1, got {config[key]}")
    if config["limit"] is not None and config["limit"] < 1:
        raise ValueError(f"method config {path}: limit must be >= 1, got {config['limit']}")
    for key in ("reward", "holdout", "guide"):
        if isinstance(config[key], dict):
            raise ValueError(
                f"method config {path}: {key} must be class_path/init_args of a reward, got {config[key]}"
            )
    return MethodConfig(**{field: config[field] for field in MethodConfig.__dataclass_fields__})
