"""``HFClassifierReward``: any Hugging Face sequence classifier as a text reward.

The diffusion model's ids are decoded with *its* tokenizer (``TextReward``), re-tokenized with
the *classifier's* tokenizer and scored in batches. The reward is the classifier's opinion of
one label, as ``output="log_prob"`` (default; ``log p(label | text)``, the natural reward for a
tilt ``p0(x) p(label | x)^(1/alpha)``), ``"prob"`` or ``"logit"``.

The classifier is loaded with ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` from
a local directory (``save_pretrained``) or a hub name (when a hub is reachable, or cached),
never with ``trust_remote_code``. Example (at scale)::

    reward = HFClassifierReward("s-nlp/roberta_toxicity_classifier", label="toxic",
                                tokenizer="checkpoints/mdlm-owt", scale=-1.0, device="cuda")

``label`` is a name in ``config.label2id`` or an integer class index. The default
``success_threshold`` is the decision boundary of a binary choice: probability 0.5, i.e.
``log 0.5`` for ``"log_prob"``, ``0.5`` for ``"prob"`` and ``0.0`` for ``"logit"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .text import TextReward

__all__ = ["HFClassifierReward"]

OUTPUTS = ("log_prob", "prob", "logit")


class HFClassifierReward(TextReward):
    """A Hugging Face sequence classifier's score of ``label`` on decoded text.

    Args:
        model: a local classifier directory or a hub name.
        label: the class to score: a label name (``config.label2id``) or an index.
        tokenizer: the *diffusion model's* tokenizer (see ``TextReward``).
        output: ``"log_prob"``, ``"prob"`` or ``"logit"`` of ``label``.
        batch_size: texts per forward pass.
        device: where the classifier runs (``None``: CUDA when available, else CPU).
        max_length: classifier tokens kept per text (truncation); ``None``: the classifier
            tokenizer's ``model_max_length`` capped at 512.
        classifier_tokenizer: the classifier's own tokenizer (default: the one in ``model``).
        scale, success_threshold: see ``TextReward``.
        local_files_only: never try the hub (directories are always read locally).
    """

    differentiable = False

    def __init__(
        self,
        model: str | Path,
        label: str | int,
        tokenizer: str | Path | None = None,
        output: str = "log_prob",
        batch_size: int = 32,
        device: str | None = None,
        max_length: int | None = None,
        classifier_tokenizer: str | Path | None = None,
        scale: float = 1.0,
        success_threshold: float | None = None,
        local_files_only: bool = False,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: choose one of {', '.join(OUTPUTS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if success_threshold is None:
            success_threshold = {"log_prob": math.log(0.5), "prob": 0.5, "logit": 0.0}[output]
        super().__init__(tokenizer, scale, success_threshold)
        self.model_name = str(model)
        self.output, self.batch_size = output, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = f"hf:{Path(self.model_name).name or self.model_name}"
        self.classifier, self.classifier_tokenizer = _load(
            self.model_name, classifier_tokenizer, local_files_only
        )
        self.classifier.to(self.device).eval()
        self.label_index = self._label_index(label)
        self.label = label
        limit = getattr(self.classifier_tokenizer, "model_max_length", 512) or 512
        self.max_length = max_length if max_length is not None else min(int(limit), 512)

    def _label_index(self, label: str | int) -> int:
        config = self.classifier.config
        num_labels = int(config.num_labels)
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        if isinstance(label, str) and label in label2id:
            index = label2id[label]
        elif isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
            index = int(label)
        else:
            raise ValueError(
                f"label={label!r} is not a label of classifier {self.model_name!r}; its labels "
                f"are {sorted(label2id, key=label2id.get)} (or an index in [0, {num_labels}))"
            )
        if not 0 <= index < num_labels:
            raise ValueError(
                f"label index {index} is out of range for classifier {self.model_name!r} "
                f"with {num_labels} labels"
            )
        return index

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            inputs = self.classifier_tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.classifier(**inputs).logits.double()
            if self.output == "logit":
                values = logits[:, self.label_index]
            elif self.output == "prob":
                values = torch.softmax(logits, dim=-1)[:, self.label_index]
            else:
                values = torch.log_softmax(logits, dim=-1)[:, self.label_index]
            scores.extend(values.cpu().tolist())
        return scores

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "model": self.model_name,
            "label": self.label_index,
            "output": self.output,
            "max_length": self.max_length,
        }


def _load(model: str, classifier_tokenizer: str | Path | None, local_files_only: bool):
    """``(classifier, tokenizer)``, or an error that names what could not be loaded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer_source = str(classifier_tokenizer) if classifier_tokenizer is not None else model
    for source in {model, tokenizer_source}:
        looks_local = Path(source).is_absolute() or source.startswith((".", "~"))
        if looks_local and not Path(source).expanduser().is_dir():
            raise FileNotFoundError(
                f"HFClassifierReward: classifier {source!r} is not a directory; pass a "
                "save_pretrained directory of a sequence classifier or a hub name"
            )
        if local_files_only and not looks_local and not _cached(source):
            raise FileNotFoundError(
                f"HFClassifierReward: classifier {source!r} is neither a directory nor in the "
                "local Hugging Face cache, and local_files_only=True forbids the hub"
            )
    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(
            model, local_files_only=local_files_only, trust_remote_code=False
        )
        tok = AutoTokenizer.from_pretrained(
            tokenizer_source, local_files_only=local_files_only, trust_remote_code=False
        )
    except Exception as err:  # missing files, no hub, unknown architecture: name the source
        raise OSError(
            f"HFClassifierReward: could not load the sequence classifier {model!r} "
            f"(tokenizer {tokenizer_source!r}): {err}. Pass a local save_pretrained directory "
            "holding config.json, the weights and a tokenizer, or a hub name reachable from "
            "here (remote code is never run)"
        ) from err
    if tok.pad_token is None:  # GPT-2-style classifiers: pad with EOS for batching
        tok.pad_token = tok.eos_token
    return classifier, tok


def _cached(source: str) -> bool:
    """Whether ``source`` is a directory or a hub name with a cached ``config.json``."""
    if Path(source).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # an invalid repo id, or no huggingface_hub: not cached
        return False
