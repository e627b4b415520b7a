"""Reasoning benchmarks: few-shot prompts, answer extraction, scoring, pass@k (issue 16).

Tasks: ``"gsm8k"``, ``"math500"`` (alias ``"math"``), ``"humaneval"``, ``"mbpp"``; records come
from ``lightning_smc.data.reasoning.load_benchmark``. Conventions follow lm-evaluation-harness
(the SR-SMC evaluation), re-implemented here:

GSM8K, 5-shot
    ``"Question: {q}\\nAnswer: {worked solution ending in '#### n'}"`` blocks joined by blank
    lines, the target last as ``"Question: {q}\\nAnswer:"``; generation stops at
    ``"Question:"``. **strict** extraction takes the first ``#### <number>``; **flexible** the
    last number-like string in the text (lm-eval's ``(-?[$0-9.,]{2,})|(-?[0-9]+)``). Both sides
    pass ``normalize_number`` (commas, ``$``, a trailing ``.``, a zero fraction ``18.0``); a
    record is correct when the strings are equal. ``score`` returns both; ``correct`` is strict.
MATH-500, 4-shot (Minerva prompt)
    ``"Problem:\\n{p}\\n\\nSolution: {s}"`` with ``Final Answer: The final answer is $x$. I hope it
    is correct.`` endings; the target ``"Problem:\\n{p}\\n\\nSolution:"``; stop at
    ``"Problem:"``. ``extract_math`` takes the last ``\\boxed{...}`` (nested braces), else the
    "final answer is ..." sentence; ``normalize_math_answer`` (Minerva + Hendrycks rules) is
    applied to both sides, which are equal as strings or as exact rationals.
HumanEval, 0-shot
    The prompt is the function header; the program is ``prompt + completion`` cut at lm-eval's
    stops (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``), or a fenced code block.
MBPP, 3-shot (tasks 2, 3, 4)
    ``"You are an expert Python programmer, and here is your task: {text} Your code should
    pass these tests:\\n\\n{3 asserts}\\n[BEGIN]\\n{code}\\n[DONE]"``; the target ends at
    ``[BEGIN]\\n``; the completion is cut at ``[DONE]``.

Code tasks run ``program + tests`` in ``sandbox.run_code``. ``pass_at_k(n, c, k)`` is the
unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, computed as a product.

Example::

    from lightning_smc.data.reasoning import load_benchmark
    from lightning_smc.evaluation.reasoning import build_prompt, evaluate_completions
    records = load_benchmark("gsm8k", limit=8)
    prompts = [build_prompt("gsm8k", r) for r in records]
    items, summary = evaluate_completions("gsm8k", records, generate(prompts))
    summary["accuracy"], summary["accuracy_se"]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

from ..data.reasoning import load_benchmark
from .sandbox import run_many

TASKS = ("gsm8k", "math500", "humaneval", "mbpp")
CODE_TASKS = ("humaneval", "mbpp")
_ALIASES = {"math": "math500"}
NUM_FEWSHOT = {"gsm8k": 5, "math500": 4, "humaneval": 0, "mbpp": 3}
STOP_SEQUENCES = {
    "gsm8k": ("Question:", "</s>", "<|im_end|>"),
    "math500": ("Problem:",),
    "humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
    "mbpp": ("[DONE]",),
}


def task_name(task: str) -> str:
    """The canonical task name (``"math"`` -> ``"math500"``); unknown names list the valid ones."""
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"unknown reasoning task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of ``stops`` (as lm-eval's ``until``)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------------------------- prompts


@cache
def _shots(task: str) -> tuple[dict, ...]:
    return tuple(load_benchmark(task, split="fewshot"))


def _mbpp_block(record: dict) -> str:
    tests = "\n".join(record["test_list"][:3])
    return (
        f"You are an expert Python programmer, and here is your task: {record['prompt']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def _gsm8k_block(record: dict) -> str:
    return f"Question: {record['question']}\nAnswer:"


def _math_block(record: dict) -> str:
    return f"Problem:\n{record['question']}\n\nSolution:"


def build_prompt(task: str, record: dict, num_fewshot: int | None = None) -> str:
    """The lm-eval-style prompt for ``record`` with ``num_fewshot`` exemplars (default: the task's).

    Exemplars come first, each a solved instance, separated by a blank line; the target comes
    last and ends where the model's answer starts (``"Answer:"``, ``"Solution:"``,
    ``"[BEGIN]\\n"``; HumanEval: the function header itself).
    """
    task = task_name(task)
    k = NUM_FEWSHOT[task] if num_fewshot is None else num_fewshot
    if task == "humaneval":
        if k:
            raise ValueError("humaneval is 0-shot (num_fewshot=0): its prompt is the header")
        return record["prompt"]
    shots = _shots(task)
    if not 0 <= k <= len(shots):
        raise ValueError(f"num_fewshot={k} for {task}: between 0 and {len(shots)} exemplars")
    if task == "gsm8k":
        solved = [f"{_gsm8k_block(s)} {s['solution']}" for s in shots[:k]]
        return "\n\n".join([*solved, _gsm8k_block(record)])
    if task == "math500":
        solved = [f"{_math_block(s)}\n{s['solution']}" for s in shots[:k]]
        return "\n\n".join([*solved, _math_block(record)])
    solved = [f"{_mbpp_block(s)}{s['canonical_solution']}\n[DONE]" for s in shots[:k]]
    return "\n".join([*solved, _mbpp_block(record)])


# ------------------------------------------------------------------------------------ GSM8K

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s: str | None) -> str | None:
    """``"$1,234.00"`` -> ``"1234"``: strip spaces, ``$`` and commas, one trailing ``.``, and a
    fractional part that is all zeros. Other strings pass unchanged (no rounding)."""
    if s is None:
        return None
    s = s.strip().replace(",", "").replace("$", "")
    s = s.removesuffix(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return "0" if s == "-0" else s


def extract_gsm8k(text: str, mode: str = "strict") -> str | None:
    """The answer in a GSM8K completion, normalized; ``None`` when there is none.

    ``strict``: the first ``#### <number>``; ``flexible``: the last number-like match.
    """
    if mode == "strict":
        match = _STRICT.search(text)
        return normalize_number(match.group(1)) if match else None
    if mode == "flexible":
        matches = _FLEXIBLE.findall(text)
        if not matches:
            return None
        last = next(g for g in matches[-1] if g)
        return normalize_number(last) or None
    raise ValueError(f"mode={mode!r}: use 'strict' or 'flexible'")


# ------------------------------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched), or of a
    ``\\boxed x`` up to the next ``$``; ``None`` when there is none or it is unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    head = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    after = rest[len(head) :]
    if after.startswith(" "):
        return after[1:].split("$")[0].strip()
    if not after.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(after):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return after[1:i]
    return None


_FINAL_ANSWER = re.compile(r"final answer is\s*(.*?)(?:\.\s*I hope it is correct|\n|$)", re.I)


def extract_math(text: str) -> str | None:
    """The final answer of a MATH solution: the last ``\\boxed{}``, else "final answer is X"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _FINAL_ANSWER.findall(text)
    if matches:
        answer = matches[-1].strip().rstrip(".").strip()
        return answer or None
    return None


_UNIT_WORDS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples",
)  # fmt: skip
_DROP = (
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\displaystyle", "^{\\circ}",
    "^\\circ", "\\%", "%", "\\$", "$", "\\ldots", "\\dots", "\\cdots", "{,}", '"', "\\mathrm{th}",
)  # fmt: skip


def _unwrap(s: str, command: str) -> str:
    """``\\command{x}`` -> ``x`` for every occurrence (braces matched)."""
    out, i, token = [], 0, f"\\{command}{{"
    while (j := s.find(token, i)) >= 0:
        out.append(s[i:j])
        depth, k = 1, j + len(token)
        while k < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[k], 0)
            k += 1
        out.append(s[j + len(token) : k - 1] if depth == 0 else s[j + len(token) :])
        i = k
    return "".join(out) + s[i:]


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; ``\\sqrt2`` ->
    ``\\sqrt{2}``."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math_answer(s: str | None) -> str | None:
    """A canonical string for a MATH final answer (both the reference and the prediction).

    Rules, in order (Minerva appendix D and the Hendrycks MATH ``is_equiv`` conventions):
    keep what follows the last ``=`` of a short ``x = ...``; drop ``\\text{...}`` wrappers (keep
    the text), ``\\textbf``, ``\\mbox``, ``\\boxed``; drop sizing and spacing commands (``\\left``,
    ``\\right``, ``\\!``, ``\\,``), degrees (``^\\circ``), percent and dollar signs, unit words
    (``units``, ``cm``, ``degrees`` ...); ``\\dfrac`` / ``\\tfrac`` -> ``\\frac``, ``\\frac12`` ->
    ``\\frac{1}{2}``; remove all spaces; ``0.5`` -> ``\\frac{1}{2}``, ``a/b`` -> ``\\frac{a}{b}``
    for integers; ``1,000`` -> ``1000``; a leading ``.`` gets its ``0``; a trailing ``.`` goes.
    """
    if s is None:
        return None
    s = s.strip().replace("\n", "").replace("\\\\", "\\")
    if "=" in s and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[-1]
    for command in ("boxed", "text", "textbf", "mbox", "mathrm", "mathbf"):
        s = _unwrap(s, command)
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    for token in _DROP:
        s = s.replace(token, "")
    s = re.sub(r"(?<=[0-9}])\s*(" + "|".join(_UNIT_WORDS) + r")\b", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.removesuffix(".")
    s = re.sub(r"(^|[^0-9])\.(\d)", r"\g<1>0.\2", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        s = f"\\frac{{{num}}}{{{den}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def _as_fraction(s: str) -> Fraction | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if match:
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) else value
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(prediction: str | None, reference: str | None) -> bool:
    """Equal after ``normalize_math_answer``: as strings, or as exact rational numbers."""
    a, b = normalize_math_answer(prediction), normalize_math_answer(reference)
    if a is None or b is None or a == "":
        return False
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fa == fb


# ------------------------------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*(?:[\w+-]+)?[ \t]*\n(.*?)(?:```|$)", re.S)


def _fenced(text: str) -> str | None:
    match = _FENCE.search(text)
    return match.group(1) if match else None


def _prompt_imports(prompt: str) -> str:
    lines = [ln for ln in prompt.splitlines() if re.match(r"(from\s+\S+\s+)?import\s", ln)]
    return "\n".join(lines) + ("\n" if lines else "")


def extract_code(task: str, prompt: str, completion: str, entry_point: str | None = None) -> str:
    """The candidate program (without tests) from a completion.

    HumanEval: a fenced block that defines the function is used whole (with the prompt's
    imports); otherwise ``prompt + completion`` cut at the stop sequences. MBPP: a fenced block,
    else the completion cut at ``[DONE]`` (a leading ``[BEGIN]`` dropped).
    """
    task = task_name(task)
    if task not in CODE_TASKS:
        raise ValueError(f"extract_code is for {CODE_TASKS}, not {task!r}")
    block = _fenced(completion)
    if task == "humaneval":
        if block is not None:
            defines = entry_point is None or re.search(rf"def\s+{entry_point}\s*\(", block)
            return _prompt_imports(prompt) + block if defines else prompt + block
        return prompt + truncate_at_stops(completion, STOP_SEQUENCES["humaneval"])
    code = truncate_at_stops(completion, STOP_SEQUENCES["mbpp"])
    if block is not None:
        code = block
    code = code.strip("\n")
    return code.removeprefix("[BEGIN]").lstrip("\n") + "\n"


# ---------------------------------------------------------------------------------- scoring


def _reference(task: str, record: dict) -> str | None:
    if task == "gsm8k":
        return normalize_number(record["answer"])
    return record["answer"]


def _score_answers(task: str, record: dict, completion: str) -> dict[str, Any]:
    text = truncate_at_stops(completion, STOP_SEQUENCES[task])
    reference = _reference(task, record)
    if task == "gsm8k":
        strict, flexible = extract_gsm8k(text, "strict"), extract_gsm8k(text, "flexible")
        return {
            "extracted": strict,
            "extracted_flexible": flexible,
            "reference": reference,
            "correct": strict is not None and strict == reference,
            "correct_flexible": flexible is not None and flexible == reference,
        }
    extracted = extract_math(text)
    return {
        "extracted": extracted,
        "extracted_normalized": normalize_math_answer(extracted),
        "reference": reference,
        "reference_normalized": normalize_math_answer(reference),
        "correct": math_equal(extracted, reference),
    }


def _programs(task: str, record: dict, completions: Sequence[str]) -> list[str]:
    prompt = record["prompt"] if task == "humaneval" else ""
    return [
        extract_code(task, prompt, c, record.get("entry_point")) + "\n\n" + record["tests"]
        for c in completions
    ]


def score(
    task: str, record: dict, completion: str, timeout: float = 3.0, memory_mb: int = 512
) -> dict[str, Any]:
    """Score one completion: the extracted answer, the reference and ``correct``.

    GSM8K also reports ``extracted_flexible`` / ``correct_flexible``; MATH the normalized
    strings; code tasks run the program with the record's tests in the sandbox and report
    ``status`` and ``stderr_tail``.
    """
    task = task_name(task)
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if task not in CODE_TASKS:
        return _score_answers(task, record, completion)
    (program,) = _programs(task, record, [completion])
    (result,) = run_many([program], timeout=timeout, memory_mb=memory_mb, workers=1)
    return {
        "extracted": program[: -len(record["tests"])].rstrip() + "\n",
        "reference": record["tests"],
        "correct": result.passed,
        "status": result.status,
        "stderr_tail": result.stderr_tail,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al. 2021, eq. 1).

    ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)``; the product form never
    forms the large binomials. Exactly 1 when ``n - c < k`` (every k-subset holds a pass).
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c, k must be ints, got {n!r}, {c!r}, {k!r}")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``sd / sqrt(n)`` (sample sd, ``ddof = 1``; 0 for n = 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate_completions(
    task: str,
    records: Sequence[dict],
    completions: Sequence[str] | Sequence[Sequence[str]],
    ks: Sequence[int] = (1,),
    timeout: float = 3.0,
    memory_mb: int = 512,
    workers: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``completions[i]`` (a str, or a list of n samples) against ``records[i]``.

    Returns one dict per record (``task_id``, the completions and per-sample scores, the
    record's ``correct`` = its first sample's, and for several samples ``num_correct`` and
    ``pass@k``) and a summary: ``accuracy`` (first samples) with ``accuracy_se``; GSM8K also
    ``accuracy_flexible``; with several samples ``pass@k`` and its SE for every ``k <= n`` in
    ``ks``. Code programs run ``workers`` at a time in the sandbox.
    """
    task = task_name(task)
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    if not records:
        raise ValueError("no records to evaluate")
    samples = [[c] if isinstance(c, str) else list(c) for c in completions]
    if any(not s for s in samples):
        raise ValueError("every record needs at least one completion")
    if task in CODE_TASKS:
        scores = _score_code(task, records, samples, timeout, memory_mb, workers)
    else:
        scores = [
            [_score_answers(task, r, c) for c in s] for r, s in zip(records, samples, strict=True)
        ]
    items = [_item(r, s, sc, ks) for r, s, sc in zip(records, samples, scores, strict=True)]
    return items, _summary(task, items, ks)


def _score_code(task, records, samples, timeout, memory_mb, workers) -> list[list[dict]]:
    programs = [_programs(task, r, s) for r, s in zip(records, samples, strict=True)]
    flat = [p for group in programs for p in group]
    results = iter(run_many(flat, timeout=timeout, memory_mb=memory_mb, workers=workers))
    scores = []
    for record, group in zip(records, programs, strict=True):
        row = []
        for program in group:
            result = next(results)
            row.append({
                "extracted": program[: -len(record["tests"])].rstrip() + "\n",
                "correct": result.passed,
                "status": result.status,
                "stderr_tail": result.stderr_tail,
            })  # fmt: skip
        scores.append(row)
    return scores


def _item(record: dict, completions: list[str], scores: list[dict], ks) -> dict[str, Any]:
    first = scores[0]
    item = {"task_id": record["task_id"], "completion": completions[0], **first}
    item["reference"] = first.get("reference", record.get("answer", record.get("tests")))
    if len(completions) > 1:
        n, c = len(scores), sum(s["correct"] for s in scores)
        item.update(completions=completions, samples=scores, num_samples=n, num_correct=c)
        item.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n})
    return item


def _summary(task: str, items: list[dict], ks) -> dict[str, Any]:
    accuracy, se = mean_and_se([float(i["correct"]) for i in items])
    summary = {"task": task, "num_items": len(items), "accuracy": accuracy, "accuracy_se": se}
    if task == "gsm8k":
        flexible, flexible_se = mean_and_se([float(i["correct_flexible"]) for i in items])
        summary.update(accuracy_flexible=flexible, accuracy_flexible_se=flexible_se)
    if all("num_samples" in i for i in items):
        for k in ks:
            if all(f"pass@{k}" in i for i in items):
                value, value_se = mean_and_se([i[f"pass@{k}"] for i in items])
                summary.update({f"pass@{k}": value, f"pass@{k}_se": value_se})
    return summary


def write_samples_jsonl(path: str | Path, items: Sequence[dict]) -> Path:
    """Write one JSON object per item (``evaluate_completions``'s first output); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
    return path
