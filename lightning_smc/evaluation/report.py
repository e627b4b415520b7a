"""Reports of evaluations: the summary table printed by ``sample`` and the
``RewardEvaluation`` callback (one row per metric, one column per method), and the files
``sample`` writes: ``samples.jsonl`` (one JSON line per answer: method, index, text, tokens,
final particle weights, log Ẑ, unigram entropy, reward / holdout) and ``summary.json``. Nothing
non-finite is ever written: a NaN or infinite value is an error naming the method and the
value, raised before any file is touched; both files are replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..metrics import unigram_entropy

__all__ = ["answer_records", "summary_table", "write_report"]


def _finite(method: str, key: str, value: Any) -> Any:
    """``value`` if every number in it is finite, else an error naming ``method`` and ``key``."""
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise ValueError(
            f"method {method!r}: {key} is not finite ({value}); nothing was written. Check the "
            "method's potential settings (alpha, beta, temperature) and the reward's range"
        )
    return value


def answer_records(name: str, result: Any, summary: dict[str, float]) -> list[str]:
    """One JSON line per answer of ``result`` (an ``evaluation.MethodResult``), after checking
    that the method's ``summary`` and every record are finite."""
    for key, value in summary.items():
        _finite(name, f"metric {key}", value)
    lines = []
    for i, text in enumerate(result.texts):
        record = {
            "method": name,
            "index": int(result.index[i]),
            "text": text,
            "tokens": result.tokens[i].tolist(),
            "weights": result.weights[i].tolist(),
            "log_normalizer": float(result.log_normalizer[i]),
            "entropy": unigram_entropy(result.tokens[i]),
        }
        for key in ("reward", "holdout"):
            values = getattr(result, key)
            if values is not None:
                record[key] = float(values[i])
        for key, value in record.items():
            _finite(name, f"{key} of answer {record['index']}", value)
        lines.append(json.dumps(record, allow_nan=False))
    return lines


def write_report(out: str | Path, summaries: dict[str, dict[str, float]], lines: list[str]) -> Path:
    """Write ``samples.jsonl`` and ``summary.json`` into ``out`` (created), each atomically."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "samples.jsonl", "\n".join(lines) + "\n")
    _write_atomic(out_dir / "summary.json", json.dumps(summaries, indent=2, allow_nan=False) + "\n")
    return out_dir


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def summary_table(title: str, summaries: dict[str, dict[str, float]]):
    """A ``rich`` table of metric summaries: one row per metric, one column per method (stays
    readable however many metrics there are); a metric a method lacks shows ``-``."""
    from rich.table import Table

    keys = list(dict.fromkeys(k for row in summaries.values() for k in row))
    table = Table(title=title)
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")
    for key in keys:
        if key.endswith("_se") and key[:-3] in keys:
            continue  # shown with its mean
        table.add_row(key, *(_cell(row, key) for row in summaries.values()))
    return table


def _cell(row: dict[str, float], key: str) -> str:
    """``mean ± se`` when the summary has the key's standard error, else the value."""
    if key not in row:
        return "-"
    if f"{key}_se" in row:
        return f"{row[key]:.4g} ± {row[key + '_se']:.2g}"
    return f"{row[key]:.4g}"
