"""The exact-target tests have power: removing any single weight term makes some of them fail."""

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "weight_ablations.py"
_spec = importlib.util.spec_from_file_location("weight_ablations", _SCRIPT)
weight_ablations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weight_ablations)
run_ablation = weight_ablations.run_ablation

EXPECTED = {  # ablation -> tests that must fail without that term
    "no-self-reward-weight": "test_self_reward_targets_p0_squared",
    "no-proposal-correction": "test_reward_tilt_with_a_different_denoiser_proposal",
    "no-final-reward": "test_reward_tilt_base_proposal",
    "no-product-normalizer": "test_product_target_with_guidance_weight_two",
    "no-resample-in-log-Z": "test_reward_tilt_base_proposal",
}


@pytest.mark.parametrize("ablation", list(EXPECTED))
def test_removing_a_weight_term_fails_the_exact_tests(ablation):
    res = run_ablation(ablation, EXPECTED[ablation])
    assert res.returncode == 1, res.stdout[-2000:]
    assert (
        "failed" in res.stdout and "error" not in res.stdout.lower().split("short test summary")[-1]
    )


def test_without_ablation_the_same_tests_pass():
    res = run_ablation("none", "test_self_reward_targets_p0_squared")
    assert res.returncode == 0, res.stdout[-2000:]
