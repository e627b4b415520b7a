"""The exact-target tests have power: removing any single weight term makes some of them fail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {  # ablation -> tests that must fail without that term
    "no-self-reward-weight": "test_self_reward_targets_p0_squared",
    "no-proposal-correction": "test_reward_tilt_with_a_different_denoiser_proposal",
    "no-final-reward": "test_reward_tilt_base_proposal",
    "no-product-normalizer": "test_product_target_with_guidance_weight_two",
    "no-resample-in-log-Z": "test_reward_tilt_base_proposal",
}


@pytest.mark.parametrize("ablation", list(EXPECTED))
def test_removing_a_weight_term_fails_the_exact_tests(ablation):
    env = dict(os.environ, LSMC_ABLATION=ablation, PYTHONPATH=str(ROOT / "experiments"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "weight_ablations",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_exact_targets.py"),
        "-k",
        EXPECTED[ablation],
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:]
    assert (
        "failed" in res.stdout and "error" not in res.stdout.lower().split("short test summary")[-1]
    )
