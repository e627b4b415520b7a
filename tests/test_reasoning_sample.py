"""``python -m lightning_smc.sample --task ...``: reasoning benchmarks decoded by a diffusion LLM
(the plumbing, on tiny random LLaDA / Dream folders: accuracy is ~0, the files are checked), and
the backbone dispatch of ``models.loading``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lightning_smc.data.reasoning import load_benchmark
from lightning_smc.evaluation.reasoning import build_prompt
from lightning_smc.methods import Method, SelfRewardSpec, complete_prompts
from lightning_smc.models.dllm_cache import CachedDiffusionLM
from lightning_smc.models.dream import DreamConfig, DreamDenoiser, DreamModel
from lightning_smc.models.llada import LLaDAConfig, LLaDADenoiser, LLaDAModelLM
from lightning_smc.models.loading import load_denoiser, load_model, model_kind
from lightning_smc.models.tokenizer import save_tokenizer, train_bpe
from lightning_smc.sample import main

VOCAB = 512


def tiny_dllm_folder(folder: Path, kind: str = "llada", seed: int = 0) -> Path:
    """A random LLaDA / Dream (one layer, width 32) saved with ``save_pretrained`` beside a
    byte-level BPE trained on the GSM8K few-shot prompts (end token 0, pad 1, mask last)."""
    folder = Path(folder)
    texts = [build_prompt("gsm8k", r) for r in load_benchmark("gsm8k", limit=4)]
    spec = train_bpe(texts, vocab_size=VOCAB, min_frequency=1)
    V = spec.vocab_size
    assert V == VOCAB
    ids = dict(mask_token_id=V - 1, eos_token_id=0, pad_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    if kind == "llada":
        config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, mlp_hidden_size=64,
                             vocab_size=V, embedding_size=V, **ids)  # fmt: skip
        model = LLaDAModelLM(config)
    else:
        config = DreamConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                             max_position_embeddings=4096, **ids)  # fmt: skip
        model = DreamModel(config)
    model.save_pretrained(folder)
    save_tokenizer(spec.tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    return tiny_dllm_folder(tmp_path_factory.mktemp("llada") / "tiny")


def test_loading_dispatches_on_the_config(llada_folder, tmp_path):
    assert model_kind(llada_folder) == "llada" and model_kind("embedded") == "mdlm"
    denoiser, spec = load_model(llada_folder)
    assert isinstance(denoiser, LLaDADenoiser) and denoiser.eos_id == (0,)
    assert spec.mask_id == denoiser.mask_id == VOCAB - 1 and spec.vocab_size == VOCAB
    assert next(denoiser.parameters()).dtype == torch.float32
    half = load_denoiser(llada_folder, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    dream = tiny_dllm_folder(tmp_path / "dream", kind="dream")
    assert model_kind(dream) == "dream" and isinstance(load_denoiser(dream), DreamDenoiser)
    with pytest.raises(ValueError, match="dtype"):
        load_denoiser("embedded", dtype="bfloat16")


def test_complete_prompts_is_independent_of_batching(llada_folder):
    denoiser, spec = load_model(llada_folder)
    method = Method(name="SR-SMC", num_particles=2, num_steps=8, unmasking="threshold",
                    block_length=8, potential=SelfRewardSpec(), select="confidence",
                    resample_when="block:0.5", stop_at_eos=True)  # fmt: skip
    prompts = ["Question: 1 + 1?\nAnswer:", "Question: What is 12 times 3?\nAnswer:", "Q:"]
    one = complete_prompts(method, denoiser, spec.tokenizer, prompts, 16, batch_size=3, seed=1)
    each = complete_prompts(method, denoiser, spec.tokenizer, prompts, 16, batch_size=1, seed=1)
    assert one.texts == each.texts and len(one.texts) == 3
    assert one.prompt_tokens == each.prompt_tokens and one.prompt_tokens[2] < one.prompt_tokens[1]
    assert len(one.nfe) == len(each.nfe) == 3 and one.seconds > 0  # one entry per prompt
    assert len(set(one.nfe)) == 1 and len(one.steps) == 3  # the value of its batch
    # the KV cache is built for the method's blocks and keeps the end tokens
    cached = Method(**{**method.to_dict(), "potential": SelfRewardSpec(), "kv_cache": "prefix"})
    out = complete_prompts(cached, denoiser, spec.tokenizer, prompts[:1], 16, seed=1)
    assert len(out.texts) == 1
    from lightning_smc.methods import build_sampler

    sampler = build_sampler(cached, denoiser)
    assert isinstance(sampler.denoiser, CachedDiffusionLM) and sampler.eos_ids == (0,)


def test_a_shard_of_the_prompts_completes_as_the_slice_of_the_whole_run(llada_folder):
    """Prompt ``i`` is seeded by its global index ``first_index + i``: the completions of a
    contiguous block (one rank's share under torchrun) are the block of the whole run's."""
    denoiser, spec = load_model(llada_folder)
    method = Method(name="SR-SMC", num_particles=2, num_steps=4, potential=SelfRewardSpec(),
                    select="confidence")  # fmt: skip
    prompts = ["Question: 1 + 1?\nAnswer:", "Q: 7?", "Question: What is 12 times 3?\nAnswer:"]
    run = dict(gen_length=8, batch_size=2, seed=3)
    whole = complete_prompts(method, denoiser, spec.tokenizer, prompts, **run)
    shards = [
        complete_prompts(method, denoiser, spec.tokenizer, prompts[:2], **run),
        complete_prompts(method, denoiser, spec.tokenizer, prompts[2:], first_index=2, **run),
    ]
    assert shards[0].texts + shards[1].texts == whole.texts
    assert shards[0].nfe + shards[1].nfe == whole.nfe == [4.0] * 3
    assert shards[0].steps + shards[1].steps == whole.steps
    assert shards[0].prompt_tokens + shards[1].prompt_tokens == whole.prompt_tokens
    # the same block seeded from index 0 is another draw: the global index is what matters
    wrong = complete_prompts(method, denoiser, spec.tokenizer, prompts[2:], **run)
    assert wrong.texts != shards[1].texts
    with pytest.raises(ValueError, match="first_index must be >= 0"):
        complete_prompts(method, denoiser, spec.tokenizer, prompts, first_index=-1, **run)


def test_sample_cli_task_writes_samples_and_summary(llada_folder, tmp_path):
    out = tmp_path / "out"
    summaries = main([
        "--model", str(llada_folder), "--task", "gsm8k", "--limit", "8", "--gen_length", "32",
        "--method.name", "SR-SMC", "--method.num_particles", "2", "--method.num_steps", "32",
        "--method.unmasking", "threshold", "--method.block_length", "32",
        "--method.potential", "self_reward", "--method.resample_when", "block:0.5",
        "--method.select", "confidence", "--batch_size", "4", "--out", str(out),
    ])  # fmt: skip
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    records = load_benchmark("gsm8k", limit=8)
    for line, record in zip(lines, records, strict=True):
        assert {"prompt", "completion", "extracted", "reference", "correct"} <= set(line)
        assert line["prompt"] == build_prompt("gsm8k", record)
        assert line["reference"] == record["answer"] and line["method"] == "SR-SMC"
        assert isinstance(line["correct"], bool)
    summary = json.loads((out / "summary.json").read_text())["SR-SMC"]
    assert summary == pytest.approx(summaries["SR-SMC"])
    assert summary["num_items"] == 8 and 0 <= summary["accuracy"] <= 1
    assert summary["accuracy_se"] >= 0 and summary["nfe"] > 0 and summary["tokens_per_s"] > 0
    assert summary["accuracy"] == pytest.approx(sum(x["correct"] for x in lines) / 8)


#: SR-SMC (2 particles, resampling) in batches of 4: under 2 processes 3 problems are sampled
#: in batches [0, 1] and [2], uneven, unlike the single process's [0, 1, 2]. Fast-dLLM's
#: threshold unmasking, as the paper configs: its draws are per masked position, so a
#: left-padded prompt's answer does not depend on its batch mates (ancestral / random unmasking
#: draw position uniforms over the whole padded row, so there it does)
TWO_PROCESS_ARGS = [
    "--gen_length", "8", "--batch_size", "4", "--seed", "5",
    "--method.name", "SR-SMC", "--method.num_particles", "2", "--method.num_steps", "4",
    "--method.unmasking", "threshold", "--method.block_length", "8",
    "--method.potential", "self_reward", "--method.resample_when", "every:1",
    "--method.select", "confidence",
]  # fmt: skip


@pytest.mark.parametrize(
    "task, limit",
    [
        ("gsm8k", 3),
        pytest.param("humaneval", 3, marks=pytest.mark.slow, id="humaneval-3"),
        pytest.param("gsm8k", 1, marks=pytest.mark.slow, id="gsm8k-1"),  # rank 1 has none
    ],
)
def test_sample_cli_task_with_two_processes_writes_the_single_process_files(
    llada_folder, tmp_path, task, limit
):
    """``sample --task`` under torchrun (2 gloo ranks): each rank completes its block of the
    problems, rank zero scores them (code runs in the sandbox once) and writes samples.jsonl /
    summary.json equal to one process's, except the timings. (~20 s a case.)"""
    from test_distributed_eval import torchrun

    args = ["--model", str(llada_folder), "--task", task, "--limit", str(limit), *TWO_PROCESS_ARGS]
    one = main([*args, "--out", str(tmp_path / "one")])
    done = torchrun([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    def records(run: str) -> list[str]:  # a code error's traceback names its sandbox folder
        text = (tmp_path / run / "samples.jsonl").read_text()
        return re.sub(r"lsmc_sandbox_\w+", "lsmc_sandbox_", text).splitlines()

    assert len(records("one")) == limit and records("two") == records("one")
    two = json.loads((tmp_path / "two/summary.json").read_text())
    assert set(two) == set(one) == {"SR-SMC"}
    timing = {"tokens_per_s", "seconds"}
    assert {k: v for k, v in two["SR-SMC"].items() if k not in timing} == {
        k: v for k, v in one["SR-SMC"].items() if k not in timing
    }
    assert two["SR-SMC"]["nfe"] == 4 and two["SR-SMC"]["num_items"] == limit
    assert two["SR-SMC"]["tokens_per_s"] > 0
    assert "2 processes" in done.stdout and done.stdout.count("accuracy") == 1  # rank zero
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "samples.jsonl",
        "summary.json",
    ]


@pytest.mark.parametrize("extra", [["--num_samples", "4"], ["--prompts", "prompts.txt"]])
def test_sample_cli_task_refuses_options_it_would_ignore(llada_folder, tmp_path, extra):
    """With a task the benchmark's problems are the prompts: a prompt file or a number of
    samples would be silently ignored, so they are a named error pointing at --limit."""
    (tmp_path / "prompts.txt").write_text("a\n")
    extra = [str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
    with pytest.raises(ValueError, match="--limit"):
        main(["--model", str(llada_folder), "--task", "gsm8k", "--limit", "1", *extra,
              "--out", str(tmp_path / "out")])  # fmt: skip


def test_sample_cli_task_needs_a_diffusion_llm(tmp_path):
    with pytest.raises(ValueError, match="needs a diffusion LLM"):
        main(["--task", "gsm8k", "--limit", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not one of"):
        main(["--task", "trivia", "--limit", "1", "--out", str(tmp_path)])


def test_reasoning_paper_table_plumbing(llada_folder, tmp_path):
    """experiments/reasoning_paper_table.py on the tiny model: 4 tasks x 2 methods, 2 problems."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments/reasoning_paper_table.py"
    spec = importlib.util.spec_from_file_location("reasoning_paper_table", script)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    shrink = ["--gen_length", "8", "--method.block_length", "8", "--method.num_steps", "8"]
    results = table.main(["--model", "llada_1.5", "--weights", str(llada_folder), "--limit", "2",
                          "--device", "cpu", "--out", str(tmp_path), "--", *shrink])  # fmt: skip
    assert set(results) == set(table.TASKS)
    for task, cells in results.items():
        assert set(cells) == {"plain", "srsmc"}
        for method, summary in cells.items():
            assert summary["num_items"] == 2 and summary["task"] == task
            assert (tmp_path / "llada_1.5" / task / method / "samples.jsonl").is_file()
        assert cells["srsmc"]["particles"] == 4 and cells["plain"]["particles"] == 1
    text = (tmp_path / "llada_1.5_table.md").read_text()
    assert "| GSM8K | 2 |" in text and "| 79.8 |" in text and "| 44.2 |" in text
    assert json.loads((tmp_path / "llada_1.5_table.json").read_text()) == results


@pytest.mark.slow
def test_reasoning_paper_table_under_torchrun_equals_one_process(llada_folder, tmp_path):
    """The paper-table script under torchrun (2 gloo ranks): one process group for all 4 runs
    (2 tasks x 2 methods), problems split over the ranks, rank zero writes the same tables."""
    import os
    import subprocess
    import sys

    from lightning_smc import dist

    script = Path(__file__).resolve().parents[1] / "experiments/reasoning_paper_table.py"
    args = ["--model", "llada_1.5", "--weights", str(llada_folder), "--limit", "3",
            "--tasks", "gsm8k", "math500", "--device", "cpu", "--",
            "--gen_length", "8", "--method.block_length", "8", "--method.num_steps", "8"]  # fmt: skip
    one = tmp_path / "one"
    subprocess.run([sys.executable, str(script), *args[:-7], "--out", str(one), *args[-7:]],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    two = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={dist.free_port()}", str(script),
         *args[:-7], "--out", str(two), *args[-7:]],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("plain vs SR-SMC") == 1  # printed by rank zero only
    a = json.loads((one / "llada_1.5_table.json").read_text())
    b = json.loads((two / "llada_1.5_table.json").read_text())
    for task in ("gsm8k", "math500"):
        for method in ("plain", "srsmc"):
            x, y = a[task][method], b[task][method]
            for key in ("accuracy", "accuracy_se", "num_items", "nfe", "particles"):
                assert x[key] == y[key], (task, method, key)
            lines = [(one / "llada_1.5" / task / method / "samples.jsonl").read_text(),
                     (two / "llada_1.5" / task / method / "samples.jsonl").read_text()]  # fmt: skip
            assert lines[0] == lines[1]
