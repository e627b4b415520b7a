"""``ReasoningEvalCallback``: benchmark accuracy of a generator at validation end (issue 16).

The callback owns a fixed subset of a reasoning benchmark (GSM8K, MATH-500, HumanEval, MBPP;
``records`` given, or the first ``limit`` packaged ones), builds their few-shot prompts once
(``evaluation.reasoning.build_prompt``), and at every validation end (or ``run(trainer,
pl_module)`` on demand) asks a user-supplied ``generate(prompts) -> list[str]`` for the
completions -- the decoding code plugs the sampler in there; ``generate`` may also take the
LightningModule as ``generate(prompts, pl_module)`` when ``pass_module=True``. The completions
are scored (sandboxed for code) and logged as

``reasoning/<task>/accuracy`` and ``reasoning/<task>/accuracy_se``
    (GSM8K also ``accuracy_flexible``), and the per-item results are written to
    ``<log dir>/reasoning/<task>/step_<global step>/samples.jsonl`` (``samples_dir`` overrides the
    log dir); the latest summary is ``callback.last_summary``.

Example::

    cb = ReasoningEvalCallback("gsm8k", limit=32, generate=my_decoder)
    trainer = L.Trainer(callbacks=[cb])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ..data.reasoning import load_benchmark
from ..evaluation.reasoning import build_prompt, evaluate_completions, task_name
from ..evaluation.reasoning import write_samples_jsonl as _write_samples

Generate = Callable[..., Sequence[str]]


class ReasoningEvalCallback(L.Callback):
    """Generate, score and log a reasoning benchmark subset; see the module docstring."""

    def __init__(
        self,
        task: str,
        generate: Generate,
        records: Sequence[dict] | None = None,
        limit: int | None = 32,
        num_fewshot: int | None = None,
        pass_module: bool = False,
        every_n_validations: int = 1,
        samples_dir: str | Path | None = None,
        timeout: float = 3.0,
        workers: int = 2,
    ) -> None:
        super().__init__()
        self.task = task_name(task)
        if not callable(generate):
            raise TypeError(f"generate must be callable prompts -> completions, got {generate!r}")
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations={every_n_validations} must be >= 1")
        self.generate = generate
        self.records = (
            list(records) if records is not None else load_benchmark(self.task, limit=limit)
        )
        if not self.records:
            raise ValueError(f"no {self.task} records to evaluate (records=[] or limit=0)")
        self.prompts = [build_prompt(self.task, r, num_fewshot) for r in self.records]
        self.pass_module = pass_module
        self.every_n_validations = every_n_validations
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.timeout, self.workers = timeout, workers
        self.num_validations = 0
        self.last_summary: dict[str, Any] | None = None
        self.last_items: list[dict[str, Any]] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.num_validations += 1
        if getattr(trainer, "sanity_checking", False):
            return
        if (self.num_validations - 1) % self.every_n_validations == 0:
            self.run(trainer, pl_module)

    def _completions(self, pl_module: L.LightningModule | None) -> list[str]:
        args = (self.prompts, pl_module) if self.pass_module else (self.prompts,)
        completions = list(self.generate(*args))
        if len(completions) != len(self.prompts) or not all(
            isinstance(c, str) for c in completions
        ):
            raise ValueError(
                f"generate returned {len(completions)} items for {len(self.prompts)} prompts; it "
                "must return one completion string per prompt, in order"
            )
        return completions

    def run(self, trainer: L.Trainer | None = None, pl_module: L.LightningModule | None = None):
        """Generate, score, log and write now; returns the summary dict."""
        items, summary = evaluate_completions(
            self.task, self.records, self._completions(pl_module),
            timeout=self.timeout, workers=self.workers,
        )  # fmt: skip
        for item, prompt in zip(items, self.prompts, strict=True):
            item["prompt"] = prompt
        self.last_items, self.last_summary = items, summary
        if pl_module is not None and trainer is not None:
            metrics = {k: v for k, v in summary.items() if k.startswith(("accuracy", "pass@"))}
            for key, value in metrics.items():
                pl_module.log(f"reasoning/{self.task}/{key}", float(value), rank_zero_only=True)
        self._write(trainer, items)
        return summary

    @rank_zero_only
    def _write(self, trainer: L.Trainer | None, items: list[dict]) -> None:
        root = self.samples_dir
        if root is None:
            root = Path(trainer.log_dir or trainer.default_root_dir) if trainer else Path(".")
        step = trainer.global_step if trainer is not None else 0
        _write_samples(root / "reasoning" / self.task / f"step_{step}" / "samples.jsonl", items)
