"""experiments/reasoning_table.py: its plumbing on a tiny random LLaDA model and 4 problems."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lightning_smc.data.arithmetic import ArithmeticDataModule
from lightning_smc.models.llada import LLaDAConfig, LLaDAModelLM
from lightning_smc.models.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "reasoning_table", ROOT / "experiments/reasoning_table.py"
)
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    dm = table.task_module(table.CONFIG)
    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=32,
        n_heads=2,
        n_kv_heads=2,
        n_layers=1,
        mlp_hidden_size=64,
        vocab_size=dm.vocab_size,
        embedding_size=dm.vocab_size,
        mask_token_id=dm.mask_id,
        eos_token_id=dm.eos_id,
        pad_token_id=dm.pad_id,
        bos_token_id=dm.eos_id,
        rope_theta=10000.0,
    )
    folder = tmp_path_factory.mktemp("tiny_llada")
    LLaDAModelLM(config).save_pretrained(folder)
    save_tokenizer(dm.tokenizer, folder)
    return folder


def test_table_plumbing(tiny_model, tmp_path):
    out, one_block = tmp_path / "table", str(table.task_module(table.CONFIG).gen_length)
    argv = ["--model", str(tiny_model), "--num-problems", "4", "--particles", "1", "2"]
    argv += ["--block-length", one_block]
    rows = table.main([*argv, "--steps", "8", "--out", str(out)])
    assert torch.is_grad_enabled()  # the script must not switch autograd off for its caller
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("plain N=1", "baseline"),
        ("SR-SMC N=1", "equal steps"),
        ("SR-SMC N=2", "equal steps"),
        ("SR-SMC N=2", "equal NFE"),
    ]
    # NFE per answer: T steps per particle; equal NFE halves the steps for N=2
    assert [r["nfe_per_answer"] for r in rows] == [8, 8, 16, 8]
    assert [r["num_steps"] for r in rows] == [8, 8, 8, 4]
    for r in rows:
        assert r["n"] == 4 and 0 <= r["accuracy"] <= 1 and r["seconds_per_answer"] > 0
        assert r["se"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 4))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == rows and saved["settings"]["num_problems"] == 4
    assert "| SR-SMC N=2 | equal NFE | 4 | 8 |" in out.with_suffix(".md").read_text()
    # the same seeds give the same answers (batching does not matter)
    again = table.main([*argv, "--steps", "8", "--batch-rows", "3", "--out", str(out)])
    assert [r["examples"] for r in again] == [r["examples"] for r in rows]


def test_correct_answers_are_counted(tiny_model, monkeypatch):
    """A denoiser that always puts all mass on the true answer tokens scores 100%."""
    dm = ArithmeticDataModule(**table.yaml.safe_load(table.CONFIG.read_text())["data"]["init_args"])
    problems = dm.test_problems[:3]
    rows = torch.stack([dm.encode_row(p)[0] for p in problems])

    class Oracle(torch.nn.Module):
        vocab_size, mask_id = dm.vocab_size, dm.mask_id

        def forward(self, x_t, t=None, cond=None):
            # the row whose prompt matches: logits +inf-like on its clean tokens
            match = (x_t[:, None, : dm.prompt_length] == rows[None, :, : dm.prompt_length]).all(-1)
            target = rows[match.float().argmax(-1)]
            logits = torch.full((*x_t.shape, dm.vocab_size), -30.0)
            logits.scatter_(-1, target[..., None], 30.0)
            logits[..., dm.mask_id] = -torch.inf
            return logits

    method = table.Method(num_steps=dm.gen_length, unmasking="low_confidence", block_length=8)
    result = table.evaluate(method, Oracle(), dm, problems, seed=0, batch_rows=8)
    assert result["accuracy"] == 1.0 and result["se"] == 0.0
