"""``python -m lightning_smc.sample``: run method configs with the shared sampler (jsonargparse CLI).

One parser, like ``fit``: ``--config FILE`` loads a method config (``configs/methods/**.yaml``:
``method`` + ``model`` + scorers + sizes) or a comparison file (``configs/eval/*.yaml``, whose
``runs:`` list method configs); any key can be overridden with a dotted flag
(``--method.num_particles 8``, ``--seq_len 32``); ``--print_config`` prints the resolved config;
``--help`` lists every option with its doc. Without ``--config`` the run uses the defaults of
``Method`` and of the method-config keys, so a quick run is a config plus overrides::

    python -m lightning_smc.sample --config configs/methods/embedded/srsmc.yaml \\
        --model outputs/mdlm_tiny/hf --prompt "KING" --num_samples 4

``--compare A.yaml B.yaml ...`` runs several configs on the same prompts and seeds; a
comparison file's runs get, in order, their file, the file's common ``overrides``, their own
``overrides``, then the command line (the command line wins). ``--nfe_budget B`` gives every
method the steps that spend ``B`` network evaluations per answer. Answers go to ``--out``
(``samples.jsonl``, one line per answer, and ``summary.json``, written atomically by rank zero);
``main(argv)`` returns the summaries ``{method: {metric: value}}``.

**Image models.** A config whose ``model`` is an image model (``embedded_image``,
``random_tiny_image`` or a folder written by ``ImagePretraining``; ``configs/methods/images/``)
draws one image per class label instead: ``--prompt`` is a class (id or name) for every sample,
``--prompts`` a file of classes, else labels cycle over the classes for ``num_samples``;
``seq_len`` is the token grid's ``h * w``. ``--out`` then gets ``samples.npz`` (tokens, images,
labels, log-weights, ESS), ``grid_<method>.png`` (and ``strip_<method>.png``: one sample's
particles around its first resample) and ``summary.json`` (``evaluation.images``); one process.

**Reasoning benchmarks.** A run with ``task`` (``gsm8k``, ``math500``, ``humaneval``, ``mbpp``;
``configs/methods/dllm/``) on an LLaDA / Dream folder builds the task's few-shot prompts for
its first ``limit`` problems (``evaluation.reasoning.build_prompt``), decodes ``gen_length``
tokens after each left-padded prompt (``methods.complete_prompts``) and scores them
(``evaluate_completions``): ``--out`` gets ``samples.jsonl`` (per problem: ``method``,
``prompt``, ``completion``, ``extracted``, ``reference``, ``correct``) and ``summary.json``
(per method: ``accuracy`` and ``accuracy_se``, NFE, steps, tokens/s)::

    python -m lightning_smc.sample --config configs/methods/dllm/llada_instruct_srsmc.yaml \\
        --model checkpoints/LLaDA-8B-Instruct --task gsm8k --limit 8 --device cuda

A reasoning run splits over ``torchrun``'s processes too: each GPU completes a contiguous block
of the problems (prompt ``i`` seeded by its global index, so the answers are a single
process's) and rank zero scores them all and writes the same two files::

    torchrun --nproc_per_node 8 -m lightning_smc.sample \\
        --config configs/methods/dllm/llada_instruct_srsmc.yaml \\
        --model checkpoints/LLaDA-8B-Instruct --task gsm8k --device cuda

Under ``torchrun`` each rank samples a block of the prompts, metrics are reduced across ranks and
rank zero writes the files, identical to one process's. Nothing non-finite is ever written: a
NaN or infinite value is an error naming the method and the metric. The exact toy demo lives in
``experiments/toy_sample.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import ActionConfigFile, Namespace
from jsonargparse.typing import Path_fr, PositiveInt
from rich.console import Console

from .metrics import SMOLLM2
from .metrics.registry import DEFAULT_METRICS
from .models.loading import EMBEDDED, load_model

__all__ = ["EMBEDDED", "SAMPLE_METRICS", "SampleOptions", "load_model", "main", "sample_parser"]

SAMPLE_METRICS = (*DEFAULT_METRICS[:3], "entropy", "dist", *DEFAULT_METRICS[3:])
"""The metrics without ``--metrics`` (minus those whose scorer is missing)."""


class SampleUsageError(ValueError):
    """A bad option or config given to ``sample``; the message names the option and the fix."""


@dataclass
class SampleOptions:
    """What ``sample`` does around the runs (the runs themselves come from ``--config``).

    Args:
        out: folder for ``samples.jsonl`` and ``summary.json`` (written atomically).
        metrics: comma-separated metric names (``lightning_smc.metrics.registry``, e.g.
            ``reward,entropy,log_z``); default: every metric whose scorer is present but gen_ppl.
        gen_ppl: add ``gen_ppl`` (generative perplexity under ``gen_ppl_model``) to the metrics.
        gen_ppl_model: the perplexity scorer: ``smollm2`` (embedded), a hub id or a folder.
        nfe_budget: network evaluations per answer; each method gets the steps that spend it
            (``num_particles x num_steps x evaluations per step``), a compute-matched comparison.
        device: ``cpu`` or ``cuda`` (``cuda:LOCAL_RANK`` under torchrun).
        prompt: one text prefix that every answer continues (``num_samples`` answers); instead
            of ``--prompts FILE``.
    """

    out: str = "outputs/sample"
    metrics: str | None = None
    gen_ppl: bool = False
    gen_ppl_model: str = SMOLLM2
    nfe_budget: PositiveInt | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    prompt: str | None = None


@dataclass
class ComparisonRun:
    """One entry of a comparison file's ``runs:``.

    Args:
        config: a method config file (relative to the comparison file).
        overrides: command-line style overrides of that config (``[--method.name, x]``).
    """

    config: Path_fr
    overrides: list[str] = field(default_factory=list)


#: old dash spellings that still work (forwarded to the new option)
RENAMED = {
    "--nfe-budget": "--nfe_budget",
    "--gen-ppl": "--gen_ppl",
    "--gen-ppl-model": "--gen_ppl_model",
    "--seq-len": "--seq_len",
    "--num-samples": "--num_samples",
    "--batch-size": "--batch_size",
}
#: options of the old hand-parsed modes, refused with their new spelling
REMOVED = {
    "--toy": "the exact toy demo moved: python experiments/toy_sample.py --method srsmc",
    "--checkpoint": "use --model PATH (a save_pretrained folder, or embedded)",
    "--particles": "use --method.num_particles N",
    "--steps": "use --method.num_steps T",
    "--unmasking": "use --method.unmasking {ancestral,random,low_confidence,threshold}",
    "--cache": "use --method.cache true",
    "--alpha": "use --method.potential RewardTiltSpec --method.potential.alpha A",
}
#: what a valid value looks like, for parse errors
HINTS = {
    "nfe_budget": "a positive integer number of network evaluations per answer, e.g. --nfe_budget 256",
    "device": "cpu or cuda",
    "gen_ppl": "true or false, e.g. --gen_ppl true",
    "method": "a method config file or its fields (--method.potential self_reward); the old "
    "--method plain|srsmc|tilt is a method config now (configs/methods/embedded/srsmc.yaml)",
    "compare": "one or more method config files: --compare A.yaml B.yaml",
}
FIT_KEYS = {"trainer", "data", "optimizer", "lr_scheduler", "ckpt_path"}


# ---------------------------------------------------------------------------------- parser
class _Renamed(argparse.Action):
    """An old spelling: does what the new option does (``RENAMED``)."""

    def __init__(self, option_strings, dest, new: str, flag: bool = False, **kwargs):
        super().__init__(option_strings, dest, nargs=0 if flag else None, **kwargs)
        self.new, self.flag = new, flag

    def __call__(self, parser, namespace, values, option_string=None):
        target = parser._option_string_actions[self.new]
        target(parser, namespace, "true" if self.flag else values, self.new)


class _Removed(argparse.Action):
    """An option of the old hand-parsed modes: an error with its new spelling (``REMOVED``)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise SampleUsageError(
            f"{option_string} is no longer an option of sample: {REMOVED[option_string]}"
        )


class _SampleConfigFile(ActionConfigFile):
    """``--config``: refuses a ``fit`` (training) config and a method in the old spelling by
    name before jsonargparse reads it."""

    def __call__(self, parser, cfg, values, option_string=None):
        path = Path(str(values))
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        if isinstance(data, dict):
            _check_config_kind(path, data)
        super().__call__(parser, cfg, values, option_string)


def _check_config_kind(path: Path, data: dict[str, Any]) -> None:
    if FIT_KEYS & set(data) or isinstance(data.get("model"), dict):
        raise SampleUsageError(
            f"--config {path} is a `fit` (training) config (keys {sorted(FIT_KEYS & set(data)) or ['model']}); "
            f"train with: python -m lightning_smc.fit --config {path}. sample takes a method config "
            "(configs/methods/**.yaml) or a comparison file (configs/eval/*.yaml)"
        )
    from .methods import config as method_config

    if isinstance(data.get("method"), dict):  # the rewrite of an old method block
        err = method_config.legacy_error(f"--config {path}", data["method"])
        if err is not None:
            raise SampleUsageError(str(err))


def sample_parser():
    """The ``sample`` parser: the method-config keys (``methods.method_parser``), the comparison
    keys (``runs``, ``overrides``) and ``SampleOptions``."""
    from .methods import method_parser

    parser = method_parser()
    parser.prog = "python -m lightning_smc.sample"
    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[1]
    for action in parser._actions:  # the method parser's plain --config, with the checks above
        if isinstance(action, ActionConfigFile):
            action.__class__ = _SampleConfigFile
            action.help = "a method config (configs/methods/**.yaml) or a comparison file (configs/eval/*.yaml)"
    parser.add_class_arguments(SampleOptions, None, as_group=False)
    parser.add_argument("--compare", nargs="+", type=str, default=None,
                        help="method config files run on the same prompts and seeds")  # fmt: skip
    parser.add_argument("--runs", type=list[ComparisonRun] | None, default=None,
                        help="a comparison file's method configs (set by --config configs/eval/*.yaml)")  # fmt: skip
    parser.add_argument("--overrides", type=list[str], default=[],
                        help="a comparison file's overrides common to its runs")  # fmt: skip
    _document(parser)
    for old, new in RENAMED.items():
        flag = new == "--gen_ppl"
        parser.add_argument(
            old, action=_Renamed, new=new, flag=flag, dest=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    for old in REMOVED:
        parser.add_argument(old, action=_Removed, dest=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _document(parser) -> None:
    """Help for ``--method.X`` that ``Method``'s grouped docstring leaves undocumented: from
    ``SMCSampler``'s doc of ``X`` (the same role, the same name)."""
    import docstring_parser

    from .sampler import SMCSampler

    sampler_docs = {}
    for param in docstring_parser.parse(SMCSampler.__doc__ or "").params:
        for name in param.arg_name.split(", "):
            sampler_docs[f"method.{name}"] = f"as in SMCSampler: {param.description}"
    for action in parser._actions:
        if not (action.help or "").strip() or action.help.startswith("(type"):
            doc = sampler_docs.get(action.dest)
            if doc:
                action.help = " ".join(doc.split())


def _parse(parser, args: list[str], namespace: Namespace | None = None) -> Namespace:
    """``parser.parse_args`` whose errors name the option and what it accepts."""
    try:
        return parser.parse_args(args, namespace=namespace)
    except argparse.ArgumentError as err:
        text = str(err)
        key = re.search(r'Parser key "([^"]+)"', text)
        if key is None:
            raise SampleUsageError(
                f"sample: {text}\n(python -m lightning_smc.sample --help lists every option)"
            ) from None
        name = key.group(1)
        given = re.search(r"Given value: (.*)|Got value: (.*)|Unable to load config '(.*?)'", text)
        value = next((g for g in given.groups() if g), "") if given else ""
        hint = HINTS.get(name, "see python -m lightning_smc.sample --help")
        raise SampleUsageError(
            f"--{name} {value}: invalid value; expected {hint}\n{text}"
        ) from None


# ------------------------------------------------------------------------------------ runs
@dataclass
class _Run:
    label: str  # the config file the run came from (to tell two runs of one name apart)
    config: Any  # methods.MethodConfig


def resolve_runs(parser, argv: list[str], cfg: Namespace) -> list[_Run]:
    """The runs of ``cfg``: itself (one method config), each ``--compare`` file, or each entry of
    a comparison file's ``runs``; the command line is applied last to every run."""
    if cfg.compare and cfg.runs:
        raise SampleUsageError(
            "--compare and a comparison file (--config with runs:) together: give one of them"
        )
    if cfg.compare:
        entries = [(c, []) for c in cfg.compare]
    elif cfg.runs:
        entries = [(str(r.config.absolute), r.overrides) for r in cfg.runs]
    else:
        return [
            _Run(
                str(cfg.config[-1]) if cfg.get("config") else "command line",
                _method_config(parser, cfg),
            )
        ]
    runs = []
    for path, own in entries:
        if not Path(path).is_file():
            raise SampleUsageError(f"--compare {path}: no such file")
        base = _parse(parser, ["--config", path, *cfg.overrides, *own])
        if base.runs:
            raise SampleUsageError(
                f"--compare {path} is itself a comparison file; list method configs"
            )
        runs.append(_Run(path, _method_config(parser, _parse(parser, argv, namespace=base))))
    return runs


def _method_config(parser, cfg: Namespace):
    """The ``MethodConfig`` of a parsed namespace (checked like ``load_method_config``)."""
    from .methods import MethodConfig

    where = f"--config {cfg.config[-1]}" if cfg.get("config") else "sample"
    try:
        init = parser.instantiate(cfg)
    except Exception as err:  # jsonargparse names the key
        raise SampleUsageError(f"{where}: {err}") from err
    for key in ("seq_len", "num_samples", "batch_size"):
        if init[key] < 1:
            raise SampleUsageError(f"{where}: --{key} must be >= 1, got {init[key]}")
    return MethodConfig(**{f.name: init[f.name] for f in fields(MethodConfig)})


def _prompts(run, options: SampleOptions, tokenizer, mask_id: int) -> list[list[int]] | None:
    """Token ids of the prompts (``--prompt`` repeated, the ``prompts`` file, or none); a
    prompt holding the mask token is an error (it would be infilled, not continued)."""
    from .evaluation import read_prompts

    if options.prompt is not None and run.prompts is not None:
        raise SampleUsageError("--prompt and --prompts together: give one text or one file")
    if options.prompt is not None:
        ids = tokenizer.encode(options.prompt, add_special_tokens=False)
        where = "--prompt"
        if len(ids) >= run.seq_len:
            raise SampleUsageError(
                f"--prompt is {len(ids)} tokens, which leaves nothing to generate with "
                f"--seq_len {run.seq_len}; shorten it or raise --seq_len"
            )
        prompts = [ids] * run.num_samples
    elif run.prompts is not None:
        prompts, where = (
            read_prompts(run.prompts, tokenizer, run.seq_len),
            f"--prompts {run.prompts}",
        )
    else:
        return None
    for line, ids in enumerate(prompts, 1):
        if mask_id in ids:
            at = "" if where == "--prompt" else f" line {line}"
            raise SampleUsageError(
                f"{where}{at} contains the mask token (id {mask_id}, "
                f"{tokenizer.decode([mask_id])!r}): the sampler would fill it in instead of "
                "continuing the prompt; remove it from the prompt text"
            )
    return prompts


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The CLI; returns the per-method summaries (``{name: {metric: value}}``)."""
    from . import dist
    from .evaluation import evaluate_distributed
    from .methods import match_budget
    from .metrics.registry import MetricSet, parse_metric_names, success_threshold_of

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = sample_parser()
    cfg = _parse(parser, argv)
    options = SampleOptions(**{f.name: cfg[f.name] for f in fields(SampleOptions)})
    runs = resolve_runs(parser, argv, cfg)
    if _reasoning_runs(runs):
        return _sample_reasoning(runs, options)
    if _image_runs(runs):
        return _sample_images(runs, options)
    names = parse_metric_names(options.metrics) if options.metrics else None
    defaults = SAMPLE_METRICS
    if options.gen_ppl:  # adds gen_ppl to --metrics, or to the defaults
        if names is None:
            defaults = (*SAMPLE_METRICS, "gen_ppl")
        elif "gen_ppl" not in names:
            names.append("gen_ppl")
    prepared = []  # every config checked and every scorer loaded before sampling anything
    for run in runs:
        if options.nfe_budget is not None:
            run.config.method = match_budget(run.config.method, options.nfe_budget)
        config = run.config
        metrics = MetricSet(
            names,
            defaults=defaults,
            reward=config.reward is not None,
            holdout=config.holdout is not None,
            success_threshold=success_threshold_of(config.reward)
            if config.reward is not None
            else None,
            gen_ppl_model=options.gen_ppl_model,
            device=options.device,
        )
        prepared.append((run, metrics))
    with dist.process_group(options.device):
        return _sample(prepared, options, dist, evaluate_distributed)


def _image_runs(runs: list[_Run]) -> bool:
    """Whether the runs are on image models (all of them; a mixture is an error)."""
    from .models.image import is_image_model

    kinds = {is_image_model(run.config.model) for run in runs}
    if len(kinds) > 1:
        raise SampleUsageError("--compare mixes image and text models: compare one kind at a time")
    return kinds == {True}


def _reasoning_runs(runs: list[_Run]) -> bool:
    """Whether the runs are reasoning-benchmark runs (``task`` set; all of them or none)."""
    kinds = {run.config.task is not None for run in runs}
    if len(kinds) > 1:
        raise SampleUsageError("--compare mixes runs with and without task: give every run a task")
    return kinds == {True}


def _sample_reasoning(runs: list[_Run], options: SampleOptions) -> dict[str, dict[str, float]]:
    """Reasoning benchmarks on a diffusion LLM: ``samples.jsonl`` and ``summary.json``.

    Every run is checked before anything is loaded. Under ``torchrun`` each rank completes its
    contiguous block of the problems (``dist.shard_indices``; with ``method.shard_particles``
    every rank samples every problem with its share of the particles), the completions are
    gathered in problem order, and rank zero alone scores them (code runs once in the sandbox)
    and writes the files; every rank returns the same summaries."""
    from . import dist
    from .evaluation.reasoning import TASKS, task_name
    from .methods import match_budget
    from .methods.config import _KEYS
    from .models.loading import model_kind

    default_num_samples = _KEYS["num_samples"][1]

    if options.metrics or options.gen_ppl or options.prompt:
        raise SampleUsageError("--metrics / --gen_ppl / --prompt are for text runs without task")
    tasks = []
    for run in runs:
        config = run.config
        if config.prompts is not None or config.num_samples != default_num_samples:
            raise SampleUsageError(
                f"{run.label}: with task {config.task!r} the benchmark's problems are the prompts; "
                "drop prompts / num_samples and choose how many problems with --limit"
            )
        if options.nfe_budget is not None:
            config.method = match_budget(config.method, options.nfe_budget)
        try:
            tasks.append(task_name(config.task))
        except (KeyError, ValueError):
            raise SampleUsageError(f"--task {config.task}: not one of {', '.join(TASKS)}") from None
        if model_kind(config.model) == "mdlm":
            raise SampleUsageError(
                f"{run.label}: task {tasks[-1]} needs a diffusion LLM (an LLaDA or Dream folder); "
                f"{config.model} is not one (its config.json names neither)"
            )
    with dist.process_group(options.device):
        return _run_reasoning(runs, tasks, options, dist)


def _run_reasoning(runs, tasks, options: SampleOptions, dist) -> dict[str, dict[str, float]]:
    import json

    from .data.reasoning import load_benchmark
    from .evaluation.reasoning import build_prompt, evaluate_completions, write_samples_jsonl

    device = f"cuda:{dist.local_rank()}" if options.device == "cuda" else "cpu"
    world, zero = dist.world_size(), dist.is_rank_zero()
    summaries, items = {}, []
    for run, task in zip(runs, tasks, strict=True):
        config = run.config
        denoiser, spec = load_model(config.model, config.tokenizer, config.dtype)
        denoiser.to(device)
        records = load_benchmark(task, limit=config.limit)
        prompts = [build_prompt(task, r) for r in records]
        done = _complete_shard(config, denoiser, spec.tokenizer, prompts, dist)
        name = config.method.name
        name = name if name not in summaries else f"{name} ({run.label})"

        def score(task=task, records=records, prompts=prompts, done=done, config=config, name=name):
            # the sandbox runs the programs once, on rank zero; its summary reaches every rank
            scored, summary = evaluate_completions(task, records, done["texts"])
            for item, prompt in zip(scored, prompts, strict=True):
                items.append({"method": name, "prompt": prompt, **item})
            return {
                **summary,
                "particles": config.method.num_particles,
                "nfe": sum(done["nfe"]) / len(done["nfe"]),
                "steps": sum(done["steps"]) / len(done["steps"]),
                "tokens_per_s": done["generated_tokens"] / max(done["seconds"], 1e-9),
                "seconds": done["seconds"],
            }

        summaries[name] = dist.on_rank_zero(score, what=f"scoring {task}")
    if not zero:
        return summaries
    out = Path(options.out)
    write_samples_jsonl(out / "samples.jsonl", items)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    where = f"; {world} processes" if world > 1 else ""
    for name, summary in summaries.items():
        Console().print(
            f"{name}: {summary['task']} accuracy {summary['accuracy']:.3f} +- "
            f"{summary['accuracy_se']:.3f} ({summary['num_items']} problems{where}); "
            f"samples in {out / 'samples.jsonl'}"
        )
    return summaries


def _complete_shard(config, denoiser, tokenizer, prompts: list[str], dist) -> dict[str, Any]:
    """Every problem's completion, gathered from this rank's block (``complete_prompts`` with
    the block's global ``first_index``) and the other ranks' in problem order: ``texts``,
    per-problem ``nfe`` / ``steps``, ``generated_tokens`` (all ranks') and ``seconds`` (the
    slowest rank's: the wall time of the sampling)."""
    from .methods import complete_prompts

    method = config.method
    everything = method.shard_particles or dist.world_size() == 1
    own = (
        list(range(len(prompts)))
        if everything
        else dist.shard_indices(len(prompts), dist.world_size(), dist.rank())
    )
    done = complete_prompts(
        method, denoiser, tokenizer, [prompts[i] for i in own], config.gen_length,
        batch_size=config.batch_size, seed=config.seed, chat=config.chat,
        progress_bar=dist.is_rank_zero(), first_index=own[0] if own else 0,
    )  # fmt: skip
    shards = dist.all_gather_object(done)
    seconds = max(shard.seconds for shard in shards)
    if method.shard_particles:  # every rank holds every answer: rank zero's, counted once
        shards = shards[:1]
    merged = {
        key: [x for shard in shards for x in getattr(shard, key)]
        for key in ("texts", "nfe", "steps")
    }
    if len(merged["texts"]) != len(prompts):
        raise RuntimeError(
            f"sample: the shards of {dist.world_size()} process(es) hold "
            f"{len(merged['texts'])} completions for {len(prompts)} problems"
        )
    return {
        **merged,
        "generated_tokens": sum(shard.generated_tokens for shard in shards),
        "seconds": seconds,
    }


def _sample_images(runs: list[_Run], options: SampleOptions) -> dict[str, dict[str, float]]:
    """Image models: PNG grids, ``samples.npz`` and ``summary.json`` in ``--out``."""
    from .evaluation.images import run_image_config, write_image_outputs
    from .evaluation.report import summary_table
    from .methods import match_budget

    if options.metrics or options.gen_ppl:
        raise SampleUsageError("--metrics / --gen_ppl are text metrics; image runs report ESS")
    results = []
    for run in runs:
        if options.nfe_budget is not None:
            run.config.method = match_budget(run.config.method, options.nfe_budget)
        try:
            result = run_image_config(run.config, options.device, options.prompt)
        except (ValueError, FileNotFoundError) as err:
            raise SampleUsageError(f"{run.label}: {err}") from err
        if any(r.name == result.name for r in results):
            result.name = f"{result.name} ({run.label})"
        results.append(result)
    summaries = write_image_outputs(options.out, results)
    title = f"{len(results)} image method(s); samples in {Path(options.out) / 'samples.npz'}"
    Console().print(summary_table(title, summaries))
    return summaries


def _sample(prepared, options: SampleOptions, dist, evaluate) -> dict[str, dict[str, float]]:
    from .evaluation.report import answer_records, summary_table, write_report

    console = Console()
    device = f"cuda:{dist.local_rank()}" if options.device == "cuda" else "cpu"
    summaries: dict[str, dict[str, float]] = {}
    lines: list[str] = []
    for run, metrics in prepared:
        config = run.config
        denoiser, spec = load_model(config.model, config.tokenizer)
        prompts = _prompts(config, options, spec.tokenizer, denoiser.mask_id)
        for module in (denoiser, config.reward, config.holdout, config.guide):
            if isinstance(module, torch.nn.Module):
                module.to(device)
        summary, result = evaluate(
            config.method, metrics, denoiser, spec.tokenizer, prompts=prompts,
            num_samples=config.num_samples, reward=config.reward, holdout=config.holdout,
            guide=config.guide, seq_len=config.seq_len, batch_size=config.batch_size,
            seed=config.seed, progress_bar=True,
        )  # fmt: skip
        name = result.name if result.name not in summaries else f"{result.name} ({run.label})"
        method = config.method
        summaries[name] = {"particles": method.num_particles, "steps": method.num_steps, **summary}
        lines += answer_records(name, result, summary)
        if dist.is_rank_zero():
            for text in result.texts[:2]:
                console.print(f"[dim]{name}:[/dim] {text!r}")
    if dist.is_rank_zero():
        out_dir = write_report(options.out, summaries, lines)
        where = f"; {dist.world_size()} processes" if dist.world_size() > 1 else ""
        title = f"{len(prepared)} method(s){where}; samples in {out_dir / 'samples.jsonl'}"
        console.print(summary_table(title, summaries))
    return summaries


if __name__ == "__main__":
    # under torchrun, a failing rank's error is written where the launcher reports it
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(main)()
    except SampleUsageError as err:
        sys.exit(f"error: {err}")
