"""Reasoning benchmarks: packaged data, prompts, answer extraction, scoring and pass@k."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from math import comb

import pytest

from lightning_smc.data.reasoning import BENCHMARK_DIR, load_benchmark
from lightning_smc.evaluation.reasoning import (
    build_prompt,
    evaluate_completions,
    extract_code,
    extract_gsm8k,
    extract_math,
    math_equal,
    normalize_math_answer,
    normalize_number,
    pass_at_k,
    score,
    write_samples_jsonl,
)

# ------------------------------------------------------------------------- packaged data


@pytest.mark.parametrize(
    ("name", "count"), [("gsm8k", 1319), ("math500", 500), ("mbpp", 500), ("humaneval", 164)]
)
def test_packaged_counts(name, count):
    records = load_benchmark(name)
    assert len(records) == count
    assert len({r["task_id"] for r in records}) == count
    assert all(r["benchmark"] == name and "raw" in r for r in records)


def _provenance_hashes(name: str) -> set[str]:
    text = (BENCHMARK_DIR / name / "PROVENANCE.md").read_text()
    return set(re.findall(r"`([0-9a-f]{64})`", text))


@pytest.mark.parametrize("name", ["gsm8k", "math500", "mbpp", "humaneval"])
def test_packaged_sha256_matches_provenance(name):
    folder = BENCHMARK_DIR / name
    hashes = _provenance_hashes(name)
    for path in sorted(folder.glob("*.jsonl.gz")):
        digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        assert digest in hashes, f"{path.name}: sha256 {digest} is not in PROVENANCE.md"
    assert (folder / "LICENSE").is_file()


def test_mbpp_split_and_fewshot_tasks():
    ids = [int(r["task_id"].split("/")[1]) for r in load_benchmark("mbpp")]
    assert ids == list(range(11, 511))
    shots = load_benchmark("mbpp", split="fewshot")
    assert [r["task_id"] for r in shots] == ["mbpp/2", "mbpp/3", "mbpp/4"]


def test_loader_reads_local_files_and_rejects_bad_input(tmp_path):
    rows = [
        {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        {"question": "q", "answer": "#### 1,000"},
    ]
    plain = tmp_path / "g.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed = tmp_path / "g.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        records = load_benchmark("gsm8k", path=path)
        assert [r["answer"] for r in records] == ["2", "1000"]
    assert len(load_benchmark("gsm8k", limit=7)) == 7
    with pytest.raises(ValueError, match="gsm8k, math500, mbpp, humaneval"):
        load_benchmark("gsm9k")
    with pytest.raises(ValueError, match="lacks the field 'problem'"):
        load_benchmark("math500", path=plain)
    with pytest.raises(ValueError, match="split"):
        load_benchmark("gsm8k", split="train")
    with pytest.raises(ValueError, match="0-shot"):
        load_benchmark("humaneval", split="fewshot")


def test_hub_without_datasets_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a)
    )
    with pytest.raises(ImportError, match="pip install datasets"):
        load_benchmark("gsm8k", source="hub")


# ------------------------------------------------------------------------------- prompts


def test_gsm8k_prompt_has_five_shots_target_last_no_leak():
    record = load_benchmark("gsm8k", limit=1)[0]
    prompt = build_prompt("gsm8k", record)
    assert prompt.count("Question: ") == 6 and prompt.count("\n#### ") == 5
    assert prompt.endswith(f"Question: {record['question']}\nAnswer:")
    shots = load_benchmark("gsm8k", split="fewshot")
    for shot in shots:
        assert f"Question: {shot['question']}\nAnswer: {shot['solution']}" in prompt
    assert record["solution"] not in prompt  # the target's worked answer never appears
    assert prompt.count(record["question"]) == 1
    assert (
        build_prompt("gsm8k", record, num_fewshot=0) == f"Question: {record['question']}\nAnswer:"
    )


def test_math_mbpp_humaneval_prompts():
    record = load_benchmark("math500", limit=1)[0]
    prompt = build_prompt("math", record)
    assert prompt.count("Problem:\n") == 5 and prompt.count("I hope it is correct.") == 4
    assert prompt.endswith(f"Problem:\n{record['question']}\n\nSolution:")
    assert record["solution"] not in prompt

    task = load_benchmark("mbpp", limit=1)[0]
    prompt = build_prompt("mbpp", task)
    assert prompt.count("You are an expert Python programmer") == 4
    assert prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert all(t in prompt for t in task["test_list"])
    assert task["canonical_solution"] not in prompt

    he = load_benchmark("humaneval", limit=1)[0]
    assert build_prompt("humaneval", he) == he["prompt"]
    with pytest.raises(ValueError, match="0-shot"):
        build_prompt("humaneval", he, num_fewshot=2)
    with pytest.raises(ValueError, match="gsm8k, math500, humaneval, mbpp"):
        build_prompt("aime", he)


# ---------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("She makes 9*2=18 dollars.\n#### 18", "18", "18"),
        ("#### 1,234\nQuestion: next one costs 5", "1234", "5"),  # score() cuts at Question:
        ("So the answer is $1,000.", None, "1000"),
        ("#### -3.\n", "-3", "-3"),
        ("#### 18.00", "18", "18"),
        ("The total is 7 apples and 12 pears, so 19", None, "19"),
        ("no digits here", None, None),
        ("#### 5\nthen #### 6", "5", "6"),  # strict takes the first, flexible the last
    ],
)
def test_extract_gsm8k(text, strict, flexible):
    assert extract_gsm8k(text, "strict") == strict
    assert extract_gsm8k(text, "flexible") == flexible


def test_normalize_number_and_bad_mode():
    assert normalize_number(" $1,000.0 ") == "1000"
    assert normalize_number("3.50") == "3.50"  # only an all-zero fraction goes
    assert normalize_number("-0") == "0"
    with pytest.raises(ValueError, match="strict"):
        extract_gsm8k("#### 1", mode="loose")


def test_gsm8k_score_cuts_at_the_next_question():
    record = {"answer": "18", "task_id": "t"}
    out = score("gsm8k", record, " 9*2=18\n#### 18\n\nQuestion: Tom has 4 cats.\nAnswer: 4")
    assert out["extracted"] == "18" and out["correct"]
    assert out["extracted_flexible"] == "18" and out["correct_flexible"]
    wrong = score("gsm8k", record, " so 17\n#### 17")
    assert not wrong["correct"] and not wrong["correct_flexible"]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        (
            "\\boxed{1} then \\boxed{\\sqrt{2}+\\frac{3}{\\sqrt{4}}}",
            "\\sqrt{2}+\\frac{3}{\\sqrt{4}}",
        ),
        ("\\boxed 5$ done", "5"),
        ("\\fbox{7}", "7"),
        ("Final Answer: The final answer is $[2,5)$. I hope it is correct.", "$[2,5)$"),
        ("\\boxed{unclosed", None),
        ("nothing to see", None),
    ],
)
def test_extract_math(text, answer):
    assert extract_math(text) == answer


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("\\tfrac{3}{4}", "3/4"),
        ("0.5", "\\frac{1}{2}"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\text{Evelyn}", "Evelyn"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("\\$32", "32"),
        ("1,000", "1000"),
        ("5 \\text{ cm}", "5"),
        ("12 units", "12"),
        ("\\!\\!3", "3"),
        ("11\\sqrt2", "11\\sqrt{2}"),
        ("6 - 5i", "6-5i"),
        (".5", "\\frac{1}{2}"),
        ("2.0", "2"),
        ("\\frac{6}{4}", "\\frac{3}{2}"),  # equal as exact rationals
    ],
)
def test_math_equivalences(a, b):
    assert math_equal(a, b), (normalize_math_answer(a), normalize_math_answer(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [("\\frac{1}{3}", "0.33"), ("(3,\\pi)", "(3,\\frac{\\pi}{2})"), ("1,-2", "-2,1"), ("", "0")],
)
def test_math_non_equivalences(a, b):
    assert not math_equal(a, b)


def test_math_score_on_a_packaged_record():
    record = load_benchmark("math500", limit=1)[0]
    good = score(
        "math500", record, "Thus $\\boxed{\\left(3,\\dfrac{\\pi}{2}\\right)}$.\nProblem:\nX"
    )
    assert good["correct"]
    assert not score("math500", record, "\\boxed{(3, \\pi)}")["correct"]


def test_extract_code_variants():
    prompt = "from typing import List\n\n\ndef add(a, b):\n    '''Sum.'''\n"
    body = "    return a + b\n\ndef helper():\n    pass\n"
    assert extract_code("humaneval", prompt, body, "add") == prompt + "    return a + b\n"
    fenced = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    code = extract_code("humaneval", prompt, fenced, "add")
    assert (
        code.startswith("from typing import List\n") and "def add(a, b):\n    return a + b" in code
    )
    mbpp = extract_code("mbpp", "", "def f(x):\r\n  return x\n[DONE]\nYou are an expert")
    assert mbpp == "def f(x):\r\n  return x\n"
    assert (
        extract_code("mbpp", "", "```python\ndef g():\n    return 1\n```")
        == "def g():\n    return 1\n"
    )
    with pytest.raises(ValueError, match="extract_code"):
        extract_code("gsm8k", "", "x")


# ----------------------------------------------------------------------------- pass@k


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_validates():
    # C(1000, 500) overflows a float; the product form does not
    exact = 1 - comb(990, 500) / comb(1000, 500)
    assert pass_at_k(1000, 10, 500) == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


# ------------------------------------------------------------- code tasks in the sandbox

CANONICAL = 5


def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails():
    records = load_benchmark("humaneval", limit=CANONICAL)
    completions = [r["canonical_solution"] for r in records]
    items, summary = evaluate_completions("humaneval", records, completions, workers=2)
    assert [i["status"] for i in items] == ["passed"] * CANONICAL
    assert summary["accuracy"] == 1.0 and summary["accuracy_se"] == 0.0
    wrong = score("humaneval", records[0], "    return not True\n")
    assert wrong["status"] == "failed" and not wrong["correct"]


def test_mbpp_canonical_solutions_pass_and_a_wrong_one_fails():
    records = load_benchmark("mbpp", limit=CANONICAL)
    completions = [r["canonical_solution"] + "\n[DONE]" for r in records]
    items, summary = evaluate_completions("mbpp", records, completions, workers=2)
    assert [i["status"] for i in items] == ["passed"] * CANONICAL, [i["stderr_tail"] for i in items]
    assert summary["accuracy"] == 1.0
    entry = re.search(r"def (\w+)\(", records[0]["canonical_solution"]).group(1)
    wrong = score("mbpp", records[0], f"def {entry}(*args):\n    return None\n[DONE]")
    assert wrong["status"] == "failed" and not wrong["correct"]


def test_multi_sample_pass_at_k_and_samples_jsonl(tmp_path):
    records = load_benchmark("humaneval", limit=2)
    good, bad = records[0]["canonical_solution"], "    return None\n"
    completions = [[good, bad, bad], [bad, bad, bad]]
    items, summary = evaluate_completions("humaneval", records, completions, ks=(1, 2))
    assert [i["num_correct"] for i in items] == [1, 0]
    assert items[0]["pass@1"] == pytest.approx(1 / 3) and items[0]["pass@2"] == pytest.approx(2 / 3)
    assert summary["pass@1"] == pytest.approx(1 / 6) and summary["pass@2"] == pytest.approx(1 / 3)
    path = write_samples_jsonl(tmp_path / "out" / "samples.jsonl", items)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert rows[0]["correct"] is True and rows[1]["correct"] is False


def test_evaluate_completions_summary_and_errors():
    records = [{"task_id": f"t{i}", "answer": str(i)} for i in range(4)]
    completions = ["#### 0", "#### 1", "#### 7", "the answer is 3"]
    items, summary = evaluate_completions("gsm8k", records, completions)
    assert [i["correct"] for i in items] == [True, True, False, False]
    assert summary["accuracy"] == 0.5
    assert summary["accuracy_se"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sd (ddof 1) / sqrt(4)
    assert summary["accuracy_flexible"] == 0.75
    with pytest.raises(ValueError, match="2 records but 1 completions"):
        evaluate_completions("gsm8k", records[:2], ["#### 1"])


# ----------------------------------------------------------------------------- callback


def _fake_gsm8k_generate(records):
    """Answers the first half right (strict format), the rest wrong."""
    answers = {r["question"]: r["answer"] for r in records}

    def generate(prompts):
        out = []
        for i, prompt in enumerate(prompts):
            question = prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            value = answers[question] if i < len(prompts) // 2 else "-1"
            out.append(f" Working it out.\n#### {value}\n\nQuestion: filler 99")
        return out

    return generate


def test_callback_logs_accuracy_and_writes_samples_in_a_trainer(tmp_path):
    import lightning as L
    import torch

    from lightning_smc.callbacks.reasoning_eval import ReasoningEvalCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            return (self.w - batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val_loss", (self.w - batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2)))

        val_dataloader = train_dataloader

    records = load_benchmark("gsm8k", limit=6)
    callback = ReasoningEvalCallback("gsm8k", _fake_gsm8k_generate(records), records=records)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Tiny())
    assert trainer.callback_metrics["reasoning/gsm8k/accuracy"].item() == pytest.approx(0.5)
    se = (0.5 * 0.5 * 6 / 5 / 6) ** 0.5  # sd with ddof 1 of three 1s and three 0s, / sqrt(6)
    assert trainer.callback_metrics["reasoning/gsm8k/accuracy_se"].item() == pytest.approx(se)
    files = list(tmp_path.glob("reasoning/gsm8k/step_*/samples.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True] * 3 + [False] * 3
    assert rows[0]["extracted"] == records[0]["answer"] and rows[0]["prompt"].endswith("Answer:")


def test_callback_on_demand_and_bad_generate(tmp_path):
    from lightning_smc.callbacks.reasoning_eval import ReasoningEvalCallback

    records = load_benchmark("humaneval", limit=2)
    callback = ReasoningEvalCallback(
        "humaneval", lambda prompts: [r["canonical_solution"] for r in records],
        records=records, samples_dir=tmp_path,
    )  # fmt: skip
    summary = callback.run()
    assert summary["accuracy"] == 1.0
    assert (tmp_path / "reasoning/humaneval/step_0/samples.jsonl").is_file()
    short = ReasoningEvalCallback("gsm8k", lambda prompts: ["#### 1"], limit=2)
    with pytest.raises(ValueError, match="one completion string per prompt"):
        short.run()
    with pytest.raises(TypeError, match="callable"):
        ReasoningEvalCallback("gsm8k", "not a function", limit=2)
