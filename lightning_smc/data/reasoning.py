"""Reasoning benchmarks as lists of uniform records: GSM8K, MATH-500, MBPP, HumanEval.

``load_benchmark(name, path=None, split="test", limit=None, source=None)`` reads

* the **packaged** test split (default): ``lightning_smc/assets/benchmarks/<name>/test.jsonl.gz``,
  committed with its licence and provenance (``PROVENANCE.md``: source, commit, sha256);
* a **local file** (``path=``, ``.jsonl`` or ``.jsonl.gz``) in the upstream schema of the
  benchmark (the files of the original repositories, or a ``datasets`` export);
* the **Hugging Face hub** (``source="hub"``) through ``datasets`` when it is installed.

``split="test"`` is the evaluation split; ``split="fewshot"`` gives the fixed exemplars of the
few-shot prompts: GSM8K the first 5 training problems, MATH the 4 Minerva exemplars, MBPP
tasks 2, 3, 4 (HumanEval is 0-shot and has none).

Every record is a dict with the same keys for a family of tasks (the raw upstream row is kept
under ``"raw"``):

==============  ===========================================================================
all             ``benchmark``, ``task_id`` (str), ``raw``
gsm8k, math500  ``question``, ``answer`` (the reference final answer: GSM8K the number after
                ``####``, MATH the ``answer`` field), ``solution`` (the worked solution);
                MATH also ``subject``, ``level``
mbpp, humaneval ``prompt`` (MBPP: the task text; HumanEval: signature + docstring),
                ``tests`` (a program fragment run after the candidate code: MBPP setup code +
                the 3 asserts, HumanEval ``test`` + ``check(<entry_point>)``),
                ``canonical_solution`` (a complete reference program for MBPP, the body for
                HumanEval), ``entry_point``; MBPP also ``test_list``
==============  ===========================================================================

Example::

    from lightning_smc.data.reasoning import load_benchmark
    gsm = load_benchmark("gsm8k", limit=100)      # first 100 of 1,319
    gsm[0]["question"], gsm[0]["answer"]          # ('Janet’s ducks lay 16 eggs ...', '18')
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "assets" / "benchmarks"
BENCHMARKS = ("gsm8k", "math500", "mbpp", "humaneval")
SPLITS = ("test", "fewshot")
MBPP_TEST_IDS = range(11, 511)  # Austin et al. 2021: task_ids 11-510 are the test set
MBPP_FEWSHOT_IDS = (2, 3, 4)  # ... and tasks 2, 3, 4 the 3-shot prompt
_PACKAGED = {
    ("gsm8k", "test"): "gsm8k/test.jsonl.gz",
    ("gsm8k", "fewshot"): "gsm8k/fewshot.jsonl.gz",
    ("math500", "test"): "math500/test.jsonl.gz",
    ("math500", "fewshot"): "math500/fewshot_minerva.jsonl.gz",
    ("mbpp", "test"): "mbpp/test.jsonl.gz",
    ("mbpp", "fewshot"): "mbpp/test.jsonl.gz",  # the packaged file holds tasks 2-4 too
    ("humaneval", "test"): "humaneval/test.jsonl.gz",
}
# (dataset path, config, split) on the Hugging Face hub, as lm-evaluation-harness reads them.
_HUB = {
    ("gsm8k", "test"): ("openai/gsm8k", "main", "test"),
    ("gsm8k", "fewshot"): ("openai/gsm8k", "main", "train"),
    ("math500", "test"): ("HuggingFaceH4/MATH-500", None, "test"),
    ("mbpp", "test"): ("google-research-datasets/mbpp", "full", "test"),
    ("mbpp", "fewshot"): ("google-research-datasets/mbpp", "full", "prompt"),
    ("humaneval", "test"): ("openai/openai_humaneval", None, "test"),
}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` or ``.jsonl.gz`` file (gzip is detected by its magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = []
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return rows


def _gsm8k(row: dict, i: int) -> dict:
    solution = row["answer"]
    if "####" not in solution:
        raise ValueError(f"GSM8K row {i}: 'answer' has no '#### <number>' line: {solution!r}")
    final = solution.split("####")[-1].strip().replace(",", "")
    return {"task_id": f"gsm8k/{i}", "question": row["question"], "answer": final,
            "solution": solution}  # fmt: skip


def _math(row: dict, i: int) -> dict:
    return {
        "task_id": row.get("unique_id", f"math500/{i}"),
        "question": row["problem"],
        "answer": row.get("answer"),
        "solution": row["solution"],
        "subject": row.get("subject"),
        "level": row.get("level"),
    }


def _mbpp(row: dict, i: int) -> dict:
    setup = row.get("test_setup_code") or ""
    asserts = "\n".join(row["test_list"])
    return {
        "task_id": f"mbpp/{row['task_id']}",
        "prompt": row["text"] if "text" in row else row["prompt"],
        "tests": f"{setup}\n{asserts}\n" if setup else f"{asserts}\n",
        "test_list": list(row["test_list"]),
        "canonical_solution": row["code"],
        "entry_point": None,
    }


def _humaneval(row: dict, i: int) -> dict:
    return {
        "task_id": row["task_id"],
        "prompt": row["prompt"],
        "tests": f"{row['test']}\ncheck({row['entry_point']})\n",
        "canonical_solution": row["canonical_solution"],
        "entry_point": row["entry_point"],
    }


_NORMALIZE: dict[str, Callable[[dict, int], dict]] = {
    "gsm8k": _gsm8k, "math500": _math, "mbpp": _mbpp, "humaneval": _humaneval,
}  # fmt: skip


def _select_mbpp(rows: list[dict], split: str) -> list[dict]:
    """Keep the MBPP tasks of ``split`` when a file holds more (the full 974-task file)."""
    if not rows or "task_id" not in rows[0] or not isinstance(rows[0]["task_id"], int):
        return rows
    ids = set(MBPP_TEST_IDS) if split == "test" else set(MBPP_FEWSHOT_IDS)
    order = MBPP_FEWSHOT_IDS if split == "fewshot" else None
    kept = [r for r in rows if r["task_id"] in ids]
    if order is not None:
        kept.sort(key=lambda r: order.index(r["task_id"]))
    return kept


def _from_hub(name: str, split: str) -> list[dict]:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            f"load_benchmark({name!r}, source='hub') needs the Hugging Face `datasets` package: "
            "pip install datasets (or use the packaged data: source=None)"
        )
    import datasets

    path, config, hub_split = _HUB[(name, split)]
    rows = [dict(r) for r in datasets.load_dataset(path, config, split=hub_split)]
    if name == "gsm8k" and split == "fewshot":
        rows = rows[:5]
    return rows


def load_benchmark(
    name: str,
    path: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """The records of benchmark ``name`` (see the module docstring for their keys).

    ``source``: ``None`` reads ``path`` when given, else the packaged file; ``"hub"`` reads the
    Hugging Face hub with ``datasets``. ``limit`` keeps the first ``limit`` records (file order).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "humaneval" and split == "fewshot":
        raise ValueError("humaneval is evaluated 0-shot and has no 'fewshot' split; use 'test'")
    if source not in (None, "hub"):
        raise ValueError(f"source={source!r}: use None (packaged file or path=) or 'hub'")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} must be a non-negative int or None")
    if source == "hub":
        if path is not None:
            raise ValueError("give either path= (a local file) or source='hub', not both")
        rows = _from_hub(name, split)
    else:
        rows = read_jsonl(path if path is not None else BENCHMARK_DIR / _PACKAGED[(name, split)])
    if name == "mbpp":
        rows = _select_mbpp(rows, split)
    if limit is not None:
        rows = rows[:limit]
    records = []
    for i, row in enumerate(rows):
        try:
            record = _NORMALIZE[name](row, i)
        except KeyError as e:
            raise ValueError(
                f"{name} row {i} lacks the field {e.args[0]!r} of the upstream schema "
                f"(fields present: {sorted(row)}); is this a {name} file?"
            ) from e
        if split == "fewshot" and name in ("gsm8k", "math500"):
            record["task_id"] = f"{name}/fewshot/{i}"  # never equal to a test id
        records.append({"benchmark": name, **record, "raw": row})
    return records
