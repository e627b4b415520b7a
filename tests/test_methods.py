"""Method presets and their config files (configs/methods/**): parse, build, and smoke-run."""

import json
from pathlib import Path

import pytest
import torch

from lightning_smc.methods import (
    Method,
    build_sampler,
    load_method_config,
    method_parser,
    run_method,
)
from lightning_smc.pretrained import EMBEDDED_ADAPTER, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = sorted((ROOT / "configs" / "methods").rglob("*.yaml"))
IDS = [str(c.relative_to(ROOT / "configs" / "methods")) for c in METHOD_CONFIGS]

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
        "--seq_len",
        "8",
        "--num_samples",
        "2",
        "--batch_size",
        "2",
        "--method.num_steps",
        "4",
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
        if parsed.method.adapter is not None:
            overrides += ["--method.adapter", "embedded"]
    run = load_method_config(config, overrides)
    result = run_method(run)
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
    a = run_method(load_method_config(None, [*base, "--batch_size", "3"]))
    b = run_method(load_method_config(None, [*base, "--batch_size", "1"]))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.reward, b.reward)


def test_best_of_n_picks_the_highest_reward_particle():
    denoiser, _ = load_checkpoint("embedded")
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
    with pytest.raises(ValueError, match="potential='tilted' is not one of"):
        Method(potential="tilted")
    with pytest.raises(ValueError, match="needs potential: tilt"):
        Method(proposal="gradient")
    denoiser, _ = load_checkpoint("embedded")
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
