"""Method presets and their config files (configs/methods/**): parse, build, and smoke-run."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_smc.evaluation import MethodResult, run_config
from lightning_smc.methods import (
    DenoiserProposalSpec,
    Method,
    build_sampler,
    load_method_config,
    method_parser,
)
from lightning_smc.models.loading import EMBEDDED_ADAPTER, load_model

ROOT = Path(__file__).resolve().parents[1]
# image method configs (configs/methods/images/) are smoke-run by tests/test_image_pipeline.py,
# diffusion LLM ones (configs/methods/dllm/) by tests/test_configs.py
METHOD_CONFIGS = sorted(
    c
    for c in (ROOT / "configs" / "methods").rglob("*.yaml")
    if not {"images", "dllm"} & set(c.parts)
)
IDS = [str(c.relative_to(ROOT / "configs" / "methods")) for c in METHOD_CONFIGS]

# every method config shrunk to a smoke run: 2 answers of 8 tokens in 4 steps
SHRINK = ["--seq_len", "8", "--num_samples", "2", "--batch_size", "2", "--method.num_steps", "4"]
EMBEDDED_SCORERS = {
    "reward": {
        "class_path": "lightning_smc.rewards.VaderSentiment",
        "init_args": {"tokenizer": "embedded"},
    },
    "holdout": {
        "class_path": "lightning_smc.rewards.AfinnSentiment",
        "init_args": {"tokenizer": "embedded"},
    },
    "guide": {
        "class_path": "lightning_smc.rewards.PretrainedLearnedReward",
        "init_args": {"path": "embedded"},
    },
}


def test_every_method_of_the_papers_has_a_config():
    names = {c.stem for c in METHOD_CONFIGS}
    for preset in (
        "best_of_n",
        "smc_base",
        "smc_grad",
        "smc_amot",
        "prop_grad",
        "prop_amot",
        "srsmc",
    ):
        assert (ROOT / "configs/methods/embedded" / f"{preset}.yaml").is_file(), preset
        assert (ROOT / "configs/methods/owt" / f"{preset}.yaml").is_file(), preset
    assert names


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=IDS)
def test_method_config_parses_and_smoke_runs(config):
    parsed = method_parser().parse_args(["--config", str(config)])  # every key is valid
    assert parsed.method.name
    overrides = [
        *SHRINK,
        "--method.num_particles",
        str(min(parsed.method.num_particles, 2)),
    ]
    if (
        config.parent.name == "owt"
    ):  # hub models and classifiers: run the same method on the embedded ones
        overrides += ["--model", "embedded", "--tokenizer", "null"]
        for key, value in EMBEDDED_SCORERS.items():
            if parsed[key] is not None:
                overrides += [f"--{key}", json.dumps(value)]
        if "DenoiserProposalSpec" in str(parsed.method.proposal):
            overrides += ["--method.proposal.adapter", "embedded"]
    run = load_method_config(config, overrides)
    result = run_config(run)
    assert result.tokens.shape == (2, 8)
    assert len(result.texts) == 2
    if run.method.needs_reward:
        assert torch.isfinite(result.reward).all()
    if run.holdout is not None:
        assert torch.isfinite(result.holdout).all()
    assert result.nfe > 0


def test_answers_do_not_depend_on_the_batch_size():
    base = [
        "--config",
        str(ROOT / "configs/methods/embedded/smc_base.yaml"),
        "--seq_len",
        "8",
        "--num_samples",
        "3",
        "--method.num_steps",
        "4",
        "--method.num_particles",
        "2",
    ]
    a = run_config(load_method_config(None, [*base, "--batch_size", "3"]))
    b = run_config(load_method_config(None, [*base, "--batch_size", "1"]))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.reward, b.reward)


def test_best_of_n_picks_the_highest_reward_particle():
    denoiser, _ = load_model("embedded")
    reward = lambda x: (x % 7).double().mean(-1)  # noqa: E731
    method = Method(name="bon", num_particles=4, num_steps=4, select="reward")
    out = build_sampler(method, denoiser, reward).sample(
        8, batch_size=2, generator=torch.Generator().manual_seed(0)
    )
    from lightning_smc.methods import answers

    best = answers(out, method, reward)
    scores = reward(out.tokens.reshape(8, 8)).reshape(2, 4)
    assert torch.equal(reward(best), scores.max(-1).values)


def test_bad_method_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"potential='tilted' is not .*\['product', 'self_reward', 'tilt'\]"):
        Method(potential="tilted")
    with pytest.raises(ValueError, match="needs potential: RewardTiltSpec"):
        Method(proposal="gradient")
    denoiser, _ = load_model("embedded")
    with pytest.raises(ValueError, match="needs a reward"):
        build_sampler(Method(potential="tilt"), denoiser)
    with pytest.raises(ValueError, match="needs adapter"):
        build_sampler(
            Method(potential="tilt", proposal="amortized"), denoiser, reward=lambda x: x.sum(-1)
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: x\n  no_such_field: 1\n")
    with pytest.raises(ValueError, match="no_such_field"):
        load_method_config(bad)
    bad.write_text("seq_len: 0\n")
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        load_method_config(bad)


def test_embedded_adapter_is_packaged():
    assert (EMBEDDED_ADAPTER / "adapter_config.json").is_file()
    assert sum(p.stat().st_size for p in EMBEDDED_ADAPTER.iterdir()) < 3 * 2**20


def test_sample_cli_compare_writes_jsonl_and_a_summary(tmp_path):
    from lightning_smc.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING\nGood morrow, my lord\n")
    configs = [str(ROOT / "configs/methods/embedded" / f) for f in ("smc_base.yaml", "srsmc.yaml")]
    main(
        [
            "--compare",
            *configs,
            "--prompts",
            str(prompts),
            "--seq_len",
            "12",
            "--nfe-budget",
            "8",
            "--method.num_particles",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    records = [
        json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()
    ]
    assert [(r["method"], r["index"]) for r in records] == [
        ("SMCbase", 0),
        ("SMCbase", 1),
        ("SR-SMC", 0),
        ("SR-SMC", 1),
    ]
    assert all(len(r["tokens"]) == 12 and r["text"] for r in records)
    assert records[1]["text"].startswith("Good morrow, my lord")
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert set(summary) == {"SMCbase", "SR-SMC"}
    assert {"reward", "success", "holdout", "entropy", "dist_1", "nfe"} <= set(summary["SMCbase"])
    assert summary["SMCbase"]["steps"] == summary["SR-SMC"]["steps"] == 4  # 8 NFE / 2 particles


def test_bad_prompt_files_are_clear_errors(tmp_path):
    config = str(ROOT / "configs/methods/embedded/smc_base.yaml")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        run_config(load_method_config(config, ["--prompts", str(empty)]))
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "the king " * 40 + "\n")
    with pytest.raises(ValueError, match="line 2 is .* tokens"):
        run_config(load_method_config(config, ["--prompts", str(long), "--seq_len", "16"]))
    with pytest.raises(FileNotFoundError, match="not a file"):
        run_config(load_method_config(config, ["--prompts", str(tmp_path / "none.txt")]))


def test_compute_matched_budget_trades_steps_for_particles():
    from lightning_smc.methods import match_budget

    base = match_budget(Method(name="base", num_particles=1), 256)
    srsmc = match_budget(Method(name="sr", num_particles=4, potential="self_reward"), 256)
    bon = match_budget(Method(name="bon", num_particles=4, select="reward"), 256)
    amot = match_budget(
        Method(name="amot", num_particles=4, potential="tilt", proposal=DenoiserProposalSpec()),
        256,
    )
    assert (base.num_steps, srsmc.num_steps, bon.num_steps, amot.num_steps) == (256, 64, 64, 32)
    with pytest.raises(ValueError, match="less than one step"):
        match_budget(Method(num_particles=8, select="reward"), 4)


EVAL_CONFIGS = sorted((ROOT / "configs" / "eval").rglob("*.yaml"))


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=[c.name for c in EVAL_CONFIGS])
def test_comparison_config_smoke_runs(config, tmp_path):
    from lightning_smc.sample import main

    summaries = main(["--config", str(config), *SHRINK, "--out", str(tmp_path)])
    runs = yaml.safe_load(config.read_text())["runs"]
    assert len(summaries) == len(runs)
    assert all(row["steps"] == 4 for row in summaries.values())  # the command line wins
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 2 * len(runs)


# ------------------------------------------------------------------ shards and summary statistics
EVERY_STEP = [*SHRINK[:2], "--num_samples", "5", "--batch_size", "2", "--method.num_steps", "4",
              "--method.num_particles", "3", "--method.resample_when", "every:1"]  # fmt: skip


def test_shards_merge_into_the_single_process_result():
    run = load_method_config(ROOT / "configs/methods/embedded/smc_base.yaml", EVERY_STEP)
    whole = run_config(run)
    parts = [run_config(run, shard=(rank, 3)) for rank in range(3)]
    assert [p.index.tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    merged = MethodResult.merge(parts[::-1])  # any order of parts
    for field in MethodResult.__dataclass_fields__:
        a, b = getattr(whole, field), getattr(merged, field)
        if field == "sample_seconds":
            continue
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field
    with pytest.raises(ValueError, match="more than one part"):
        MethodResult.merge([parts[0], parts[0]])
    empty = run_config(dataclasses.replace(run, num_samples=1), shard=(1, 2))
    assert len(empty) == 0 and empty.tokens.shape == (0, 8) and empty.log_weights.shape == (0, 3)


def test_summary_statistics_match_the_results_fields():
    run = load_method_config(ROOT / "configs/methods/embedded/smc_base.yaml", EVERY_STEP)
    result = run_config(run)
    row = result.summary(0.5)
    log_z = result.log_normalizer
    assert row["log_z_mean"] == pytest.approx(float(log_z.mean()), rel=1e-12)
    assert row["log_z_var"] == pytest.approx(float(log_z.var()), rel=1e-12)
    assert row["resamples"] == 3.0  # after steps 1, 2 and 3 of 4
    assert 0 <= row["overtakes"] <= 3
    assert row["overtake_rate"] == pytest.approx(
        float(result.overtakes.sum()) / float(result.resampled.sum()), rel=1e-12
    )
    assert row["nfe"] == 4.0 and row["nfe_answer"] == 12.0
    assert row["success"] == float((result.reward > 0.5).double().mean())
    assert row["seconds"] > 0
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(5, dtype=torch.float64))
    assert result.summary(metrics="log_z") == {
        "log_z_mean": row["log_z_mean"],
        "log_z_var": row["log_z_var"],
    }


# ------------------------------------------------------------------ one method vocabulary
def test_specs_fields_are_their_classes_arguments():
    import inspect

    from lightning_smc.methods import SPECS

    for spec in SPECS.values():
        builds = spec.target.from_adapter if spec is DenoiserProposalSpec else spec.target
        arguments = set(inspect.signature(builds).parameters)
        assert {f.name for f in dataclasses.fields(spec)} <= arguments, spec


def test_a_method_config_builds_the_sampler_python_builds():
    import lightning_smc as ls
    from lightning_smc.methods import GradientProposalSpec, RewardTiltSpec

    config = load_method_config(
        ROOT / "configs/methods/embedded/smc_grad.yaml", ["--method.potential.alpha", "0.2"]
    )
    python = Method(
        name="SMCgrad", num_particles=8, num_steps=32, resample_when="every:8",
        potential=RewardTiltSpec(alpha=0.2, schedule="linear", num_samples=1),
        proposal=GradientProposalSpec(tau=1.0),
    )  # fmt: skip
    assert config.method == python
    denoiser, _ = load_model("embedded")
    built = build_sampler(config.method, denoiser, config.reward, guide=config.guide)
    assert type(built.potential) is ls.RewardTilt and built.potential.alpha == 0.2
    assert built.potential.reward is config.reward and built.potential.num_samples == 1
    assert type(built.proposal) is ls.GradientProposal and built.proposal.tau == 1.0
    assert built.proposal.reward is config.guide and built.proposal.alpha == 0.2


def test_old_method_spelling_is_refused_with_its_rewrite(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        "method:\n  name: SMCgrad\n  potential: tilt\n  alpha: 0.1\n  twist_schedule: linear\n"
        "  twist_samples: 1\n  proposal: gradient\n  gradient_tau: 0.5\n"
    )
    with pytest.raises(ValueError, match="twist_schedule.*old method spelling") as err:
        load_method_config(old)
    rewrite = yaml.safe_load(str(err.value).split("Rewrite it as:\n", 1)[1])["method"]
    assert rewrite["potential"] == {
        "class_path": "RewardTiltSpec",
        "init_args": {"alpha": 0.1, "schedule": "linear", "num_samples": 1},
    }
    assert rewrite["proposal"] == {"class_path": "GradientProposalSpec", "init_args": {"tau": 0.5}}
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"method": rewrite}))
    assert load_method_config(new).method.proposal.tau == 0.5  # the rewrite loads
    with pytest.raises(ValueError, match="(?s)gradient_tau.*GradientProposalSpec"):
        load_method_config(None, ["--method.gradient_tau", "0.5"])
    old.write_text("method:\n  name: x\n  potential: none\n  proposal: base\n")
    with pytest.raises(ValueError, match="potential: none, proposal: base is the old"):
        load_method_config(old)


def test_the_registry_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"\['amortized', 'gradient'\]"):
        Method(potential="tilt", proposal="gradients")
    assert Method(potential="tilt", proposal="amortized").proposal == DenoiserProposalSpec()
