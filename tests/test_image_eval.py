"""``ImageEvaluation`` with rewards and under DDP (issue 15): the image steering methods
(SMCbase, SMCamot with the module's LoRA proposal, best-of-N) evaluated on an
``AmortizedProposalModule`` with an image base, their reward / success / holdout metrics, a
2-process gloo DDP fit that logs the numbers of one process, and the named errors of bad input.

The base is ``random_tiny_image`` (an untrained seeded Meissonic with the Fashion-MNIST VQ
configuration) and the reward the committed ``ClassReward`` classifier, so every test runs on
CPU in seconds without a trained asset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_image_amortized import ATTENTION, perturb
from tolerance import rounding_tolerance

from lightning_smc import TinyTransformerDenoiser, dist
from lightning_smc.callbacks import ImageEvaluation
from lightning_smc.methods import DenoiserProposalSpec, Method, RewardTiltSpec
from lightning_smc.modules.amortized import AmortizedProposalModule
from lightning_smc.rewards import ClassReward, HoldoutClassReward

TILT = RewardTiltSpec(alpha=1.0, schedule="linear", num_samples=1)
STEPS = 4
LABELS = [10, 10, 7, 3, 10]  # 5 labels: 3 + 2 over two ranks (uneven blocks)
TIMEOUT = 180  # seconds: a hang becomes a failure, not a stuck suite


def methods() -> list[Method]:
    common = dict(num_steps=STEPS, schedule="maskgit_cosine")
    return [
        Method(name="plain", **common),
        Method(name="SMCbase", num_particles=2, potential=TILT, resample_when="always", **common),
        Method(
            name="SMCamot",
            num_particles=2,
            potential=TILT,
            proposal=DenoiserProposalSpec(),
            resample_when="always",
            **common,
        ),
        Method(name="best_of_2", num_particles=2, select="reward", **common),
    ]


def class_reward(holdout: bool = False):
    kind = HoldoutClassReward if holdout else ClassReward
    return kind(target=7, vq="random_tiny_image", clamp_min=-10.0)


def image_module(**kwargs) -> AmortizedProposalModule:
    """An image-base SMCamot module steering towards class 7 (its reward: ``ClassReward``)."""
    args = dict(
        potential=TILT,
        seq_len=49,
        num_steps=2,
        schedule="maskgit_cosine",
        rollouts=2,
        transitions=1,
        classes=[10],
        log_normalizer="mlp_cond",
        target_modules=ATTENTION,
        lora_rank=4,
        lora_alpha=4.0,
        lora_init="gaussian",
        steps_per_epoch=10,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # lora_A's gaussian init: the same adapter in every process
        return AmortizedProposalModule("random_tiny_image", class_reward(), **{**args, **kwargs})


def test_steering_methods_score_the_returned_samples_with_the_modules_reward():
    module = image_module()
    perturb(module.q, std=0.5, seed=1)  # q_phi != p_theta: the proposal now matters
    holdout = class_reward(holdout=True)
    callback = ImageEvaluation(methods(), labels=LABELS, holdout=holdout)  # reward: the module's
    results = callback.evaluate(module)
    threshold = math.log(0.5)  # ClassReward's default success threshold (p > 0.5)
    for name, row in results.items():
        samples = callback.last_samples[name]
        with torch.no_grad():
            reward = module.reward(samples.tokens).double()
            held = holdout(samples.tokens).double()
        assert row["reward"] == pytest.approx(float(reward.mean()), rel=0, abs=1e-12), name
        assert row["success"] == float((reward > threshold).double().mean()), name
        assert row["holdout"] == pytest.approx(float(held.mean()), rel=0, abs=1e-12), name
        assert row["reward_se"] == pytest.approx(float(reward.std() / len(reward) ** 0.5)), name
        assert {"ess", "resamples", "nfe", "seconds", "accuracy"} <= set(row), name
        assert samples.tokens.shape == (len(LABELS), 49) and samples.labels.tolist() == LABELS
    assert results["SMCamot"]["nfe"] == 2 * STEPS  # the proposal's network call per step
    assert results["SMCbase"]["nfe"] == STEPS and results["SMCbase"]["resamples"] == STEPS - 1
    tokens = {name: s.tokens.clone() for name, s in callback.last_samples.items()}
    # with q_phi = p_theta (a zero adapter) SMCamot draws SMCbase's particles; the methods that
    # do not propose from q_phi sample p_theta (the adapter off) whatever the adapter holds
    with torch.no_grad():
        for name, p in module.q.peft.named_parameters():
            if "lora_B" in name:
                p.zero_()
    callback.evaluate(module)
    again = {name: s.tokens for name, s in callback.last_samples.items()}
    assert torch.equal(again["SMCamot"], again["SMCbase"])
    assert not torch.equal(tokens["SMCamot"], again["SMCamot"])  # the current adapter was used
    for name in ("plain", "SMCbase", "best_of_2"):
        assert torch.equal(tokens[name], again[name]), name


def test_an_explicit_reward_replaces_the_modules_and_success_needs_a_threshold():
    module, decoder = image_module(), class_reward()

    def darkness(x0):  # a reward without success_threshold: no success metric
        return -decoder.images(x0).mean(dim=(1, 2, 3)).double()

    callback = ImageEvaluation(methods()[:2], labels=[10, 3], reward=darkness, classifier=None)
    results = callback.evaluate(module)
    for name, row in results.items():
        samples = callback.last_samples[name]
        assert row["reward"] == pytest.approx(float(darkness(samples.tokens).mean()), abs=1e-12)
        assert row["reward"] != pytest.approx(float(module.reward(samples.tokens).mean()))
        assert "success" not in row and "holdout" not in row and "accuracy" not in row


def test_bad_rewards_and_a_reward_method_without_one_are_named_errors():
    with pytest.raises(ValueError, match="reward must be a reward object"):
        ImageEvaluation(methods(), reward="ClassReward")
    with pytest.raises(ValueError, match="holdout must be a reward object"):
        ImageEvaluation(methods(), holdout={"class_path": "ClassReward"})
    with pytest.raises(ValueError, match="shard_particles"):
        ImageEvaluation([Method(name="x", num_particles=2, potential=TILT, shard_particles=True)])

    class NoReward(torch.nn.Module):  # an image module without a reward (ImagePretraining-like)
        def image_model(self):
            return image_module().image_model()

    callback = ImageEvaluation(methods(), labels=[10])
    with pytest.raises(ValueError, match=r"\['SMCbase', 'SMCamot', 'best_of_2'\] need a reward"):
        callback.setup(None, NoReward(), "fit")
    with pytest.raises(ValueError, match="need a reward"):
        callback.evaluate(NoReward())
    text = AmortizedProposalModule(
        TinyTransformerDenoiser(6, max_len=4), lambda x: x.double().sum(-1), seq_len=4, num_steps=2
    )
    with pytest.raises(ValueError, match="base='TinyTransformerDenoiser' is not an image model"):
        text.image_model()


# ------------------------------------------------------------------ DDP (Lightning, gloo)
def fit_and_record(root: str, devices: int) -> None:
    """Fit the module for one step on ``devices`` CPU processes (``devices > 1``: under
    torchrun, gloo) with ``ImageEvaluation`` at its validation; each rank writes what it holds
    and logged to ``<root>/rank<r>.json``."""
    import lightning as L

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in every process: rewards compared bit for bit
    # lr 0: the adapter stays the perturbed one, so every run evaluates the same q_phi (the
    # training's own DDP equivalence is tests/test_image_amortized.py's)
    module = image_module(lr=0.0, normalizer_lr=0.0)
    perturb(module.q, std=0.5, seed=1)
    callback = ImageEvaluation(methods(), labels=LABELS, holdout=class_reward(holdout=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, callbacks=[callback], max_steps=1, val_check_interval=1,
        limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    try:
        trainer.fit(module)
    finally:
        torch.set_num_threads(threads)
    out = {
        "history": callback.history,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if "eval/" in k},
        "tokens": {k: s.tokens.tolist() for k, s in callback.last_samples.items()},
        "strip": {k: s.strip is not None for k, s in callback.last_samples.items()},
    }
    (Path(root) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


DDP_FIT = """
import sys
sys.path.insert(0, sys.argv[2])
from test_image_eval import fit_and_record
fit_and_record(sys.argv[1], int(sys.argv[3]))
"""

# the final log-weights of a sample depend on its batch's composition only through float32
# rounding of the network's log-probabilities: STEPS steps of terms of size <= log(256 codes)
ESS_TOL = rounding_tolerance(2 * STEPS, math.log(256), ulps=4)


def _fit(root: Path, world: int, script: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={dist.free_port()}", str(script),
               str(root), str(Path(__file__).parent), str(world)]  # fmt: skip
    root.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_two_ddp_ranks_log_the_metrics_and_samples_of_one_process(tmp_path):
    """A 2-process gloo DDP fit (ranks sample 3 and 2 of the 5 labels) logs, on both ranks, the
    metrics of a 1-process fit: the same tokens, rewards, success, holdout, accuracy, NFE and
    resamples bit for bit, the ESS to the rounding of the log-weights; rank zero writes media."""
    script = tmp_path / "fit.py"
    script.write_text(DDP_FIT)
    (tmp_path / "world1").mkdir()
    fit_and_record(str(tmp_path / "world1"), 1)  # in this process
    done = _fit(tmp_path / "world2", 2, script)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = {
        world: [json.loads((tmp_path / f"world{world}" / f"rank{r}.json").read_text())
                for r in range(world)]
        for world in (1, 2)
    }  # fmt: skip
    (one,), (two, other) = runs[1], runs[2]
    assert two == other  # every rank holds and logs the same numbers and samples
    assert two["tokens"] == one["tokens"]
    resampled = ("SMCbase", "SMCamot")  # resample_when: always; best-of-2 never resamples
    assert two["strip"] == one["strip"] == {name: name in resampled for name in one["strip"]}
    assert set(two["logged"]) == set(one["logged"])
    assert {"eval/SMCamot/reward", "eval/SMCamot/success", "eval/SMCamot/holdout"} <= set(
        one["logged"]
    )
    for key, value in one["logged"].items():
        if key.endswith(("/seconds",)):  # wall time
            continue
        if key.endswith("/ess"):  # mean of 1 / sum w^2 <= N = 2 per sample
            assert two["logged"][key] == pytest.approx(value, rel=2 * ESS_TOL, abs=0), key
        else:
            assert two["logged"][key] == value, key
    for world in (1, 2):
        pngs = sorted(p.name for p in (tmp_path / f"world{world}").rglob("*.png"))
        assert "grid_SMCamot.png" in pngs and "strip_SMCamot.png" in pngs, pngs


def test_image_samples_concat_joins_blocks_in_order():
    from lightning_smc.evaluation.images import ImageSamples

    def block(labels, nfe, seconds):
        s, n = len(labels), 2
        return ImageSamples(
            name="m", labels=torch.tensor(labels), tokens=torch.arange(s * 4).reshape(s, 4),
            images=torch.zeros(s, 1, 2, 2), log_weights=torch.full((s, n), -0.5).double(),
            ess=torch.ones(s, 3).double(), resampled=torch.zeros(s, 3, dtype=torch.bool),
            nfe=nfe, seconds=seconds, scores={"reward": torch.zeros(s)},
            sample_nfe=torch.full((s,), float(nfe)).double(),
            sample_seconds=torch.full((s,), float(seconds)).double(),
        )  # fmt: skip

    a, b = block([0, 1, 2], 8.0, 1.0), block([3], 4.0, 5.0)
    joined = ImageSamples.concat([a, b])
    assert joined.labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(joined.tokens, torch.cat([a.tokens, b.tokens]))
    assert joined.nfe == pytest.approx(7.0) and joined.seconds == pytest.approx(2.0)  # per sample
    assert joined.images is None and joined.scores is None  # decoded / scored from the whole
    assert ImageSamples.concat([a]) is a
    with pytest.raises(ValueError, match="at least one"):
        ImageSamples.concat([])
