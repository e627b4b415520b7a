"""Rewards computed on decoded text: ``TextReward`` and the lexicon / classifier scorers.

A ``TextReward`` turns token ids ``x0 [B, L]`` of the *diffusion model's* vocabulary into
strings with that model's tokenizer, scores the strings with ``score_texts(list[str]) ->
list[float]`` and returns ``scale * score`` as float64 ``[B]`` (validated by
``check_reward_output``). Text rewards are not differentiable (``differentiable = False``); a
soft one-hot input ``[B, L, V]`` is an error, not silently argmaxed.

Decoding (``TextReward.decode``): ``mask_id`` and ``pad_id`` are dropped; any other special
token (EOS, BOS, ...) separates the row into pieces, which are decoded separately and joined
with a newline, so packed documents never run into one another ("end.<eos>Begin" reads
"end.\\nBegin", not "end.Begin").

The tokenizer is given at construction (``tokenizer=``) or later (``bind_tokenizer``), as

- ``"embedded"``: the tokenizer of the embedded base model ``lightning_smc/assets/mdlm_tiny``;
- a directory (a ``save_pretrained`` tokenizer or model checkpoint with its tokenizer), loaded
  with ``lightning_smc.models.tokenizer.load_tokenizer``;
- a ``TokenizerSpec`` or a ``transformers`` tokenizer object (a mask token is required).

Scales and success. ``scale`` multiplies the score (``scale=-1`` steers *away* from what the
scorer measures, e.g. to low toxicity). ``success_threshold`` is in the scorer's own units
(before ``scale``); a sample succeeds when its raw score lies beyond the threshold in the
direction the reward pushes: ``score > threshold`` for ``scale > 0``, ``score < threshold`` for
``scale < 0``. ``success_rate(x0)`` is the fraction of successes.

=====================  ================================  ==========================  =========
reward                 score (raw)                       range                       threshold
=====================  ================================  ==========================  =========
``VaderSentiment``     VADER compound                    [-1, 1]                     0.05
``AfinnSentiment``     ``tanh(sum of AFINN valences/5)``  (-1, 1)                     0.0
``ProfanityToxicity``  alt-profanity-check probability   [0, 1]                      0.5
``WordListToxicity``   better-profanity: any / fraction  {0, 1} / [0, 1]             0.0
=====================  ================================  ==========================  =========

``HFClassifierReward`` (``lightning_smc.rewards.hf``) scores with any Hugging Face sequence
classifier. Example::

    reward = VaderSentiment(tokenizer="embedded")
    reward(x0)                    # float64 [B], compound sentiment of the decoded rows
    reward.success_rate(x0)       # fraction with compound > 0.05
    detox = ProfanityToxicity(tokenizer="embedded", scale=-1.0)   # success: P(offensive) < 0.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.loading import EMBEDDED, resolve_checkpoint
from .base import BaseReward, check_reward_output

__all__ = [
    "EMBEDDED_MODEL",
    "AfinnSentiment",
    "ProfanityToxicity",
    "TextReward",
    "VaderSentiment",
    "WordListToxicity",
    "resolve_tokenizer",
]

EMBEDDED_MODEL = EMBEDDED
"""The embedded base model (and tokenizer) directory; ``tokenizer="embedded"`` names it."""


def resolve_tokenizer(tokenizer: Any):
    """A ``TokenizerSpec`` from ``"embedded"``, a directory, a spec or a tokenizer object."""
    # Imported here: the tokenizer helpers live with the data code (transformers/tokenizers only).
    from ..models.tokenizer import TokenizerSpec, load_tokenizer, tokenizer_spec

    if isinstance(tokenizer, TokenizerSpec):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(resolve_checkpoint(tokenizer))
    if hasattr(tokenizer, "decode") and hasattr(tokenizer, "mask_token_id"):
        return tokenizer_spec(tokenizer)
    raise TypeError(
        f"tokenizer={tokenizer!r}: pass 'embedded', a tokenizer directory, a TokenizerSpec or "
        "a transformers tokenizer"
    )


class TextReward(BaseReward):
    """Base class: decode ids with the diffusion model's tokenizer, then ``score_texts``.

    Args:
        tokenizer: the diffusion model's tokenizer (see the module docstring), or ``None`` to
            bind it later with ``bind_tokenizer``.
        scale: multiplier of the returned reward (``-1``: steer to low scores).
        success_threshold: threshold of ``success`` in the scorer's raw units; ``None`` keeps
            the class default (``default_threshold``).

    Subclasses set ``name`` and ``default_threshold`` and implement ``score_texts``.
    """

    name: str = "text"
    differentiable: bool = False
    default_threshold: float = 0.0

    def __init__(
        self,
        tokenizer: str | Path | None = None,
        scale: float = 1.0,
        success_threshold: float | None = None,
    ) -> None:
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(f"scale={scale} must be a finite, non-zero number")
        self.scale = float(scale)
        threshold = self.default_threshold if success_threshold is None else success_threshold
        self.success_threshold = float(threshold)
        self.spec = None
        if tokenizer is not None:
            self.bind_tokenizer(tokenizer)

    # ---- tokenizer ------------------------------------------------------------------------
    def bind_tokenizer(self, tokenizer: Any) -> TextReward:
        """Use this tokenizer (``"embedded"``, directory, ``TokenizerSpec`` or object); returns self."""
        self.spec = resolve_tokenizer(tokenizer)
        tok = self.spec.tokenizer
        drop = {self.spec.mask_id, self.spec.pad_id}
        self._drop = drop
        self._separators = {int(i) for i in tok.all_special_ids} - drop
        return self

    def _require_spec(self):
        if self.spec is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer to decode token ids with: pass "
                "tokenizer='embedded' (or a tokenizer directory) to its constructor, or call "
                ".bind_tokenizer(tokenizer) first"
            )
        return self.spec

    def decode(self, x0: Tensor) -> list[str]:
        """Text of each row of ``x0 [B, L]``: mask and pad dropped, other specials -> newline."""
        spec = self._require_spec()
        x0 = self._check_ids(x0, spec.vocab_size)
        pieces: list[list[int]] = []
        owners: list[int] = []
        for row_index, row in enumerate(x0.tolist()):
            current: list[int] = []
            for token in row:
                if token in self._separators:
                    pieces.append(current)
                    owners.append(row_index)
                    current = []
                elif token not in self._drop:
                    current.append(token)
            pieces.append(current)
            owners.append(row_index)
        decoded = spec.tokenizer.batch_decode(pieces, skip_special_tokens=True)
        rows: list[list[str]] = [[] for _ in range(x0.shape[0])]
        for owner, text in zip(owners, decoded, strict=True):
            rows[owner].append(text)
        return ["\n".join(p for p in parts if p) for parts in rows]

    def _check_ids(self, x0: Tensor, vocab_size: int) -> Tensor:
        name = type(self).__name__
        if not isinstance(x0, Tensor):
            raise TypeError(f"{name} expects a torch.Tensor of token ids [B, L]")
        if x0.is_floating_point():
            raise TypeError(
                f"{name} is not differentiable (differentiable=False): pass token ids "
                f"LongTensor [B, L], not a float tensor of shape {tuple(x0.shape)}"
            )
        if x0.dim() != 2:
            raise ValueError(f"{name} expects token ids [B, L], got shape {tuple(x0.shape)}")
        if x0.numel():
            lo, hi = (int(v) for v in torch.aminmax(x0))
            if lo < 0 or hi >= vocab_size:
                raise ValueError(
                    f"{name}: token ids must lie in [0, {vocab_size}) (the tokenizer's "
                    f"vocabulary, mask included), got [{lo}, {hi}]; is it the model's tokenizer?"
                )
        return x0.detach().cpu()

    # ---- scoring ----------------------------------------------------------------------------
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Raw scores of strings (the scorer's own units, before ``scale``)."""
        raise NotImplementedError

    def score(self, x0: Tensor) -> Tensor:
        """Raw scores ``[B]`` float64 of token ids (before ``scale``), on ``x0``'s device."""
        texts = self.decode(x0)
        values = torch.tensor(
            [float(v) for v in self.score_texts(texts)] if texts else [], dtype=torch.float64
        )
        return check_reward_output(self, values, len(texts)).to(x0.device)

    def __call__(self, x0: Tensor) -> Tensor:
        """The reward ``scale * score(x0)``, float64 ``[B]``."""
        value = self.scale * self.score(x0)
        return check_reward_output(self, value, x0.shape[0])

    def success(self, x0: Tensor) -> Tensor:
        """Bool ``[B]``: the raw score lies beyond ``success_threshold`` in the scale's direction."""
        raw = self.score(x0)
        return raw > self.success_threshold if self.scale > 0 else raw < self.success_threshold

    def success_rate(self, x0: Tensor) -> float:
        """Fraction of rows of ``x0`` that succeed (see ``success``)."""
        return float(self.success(x0).double().mean()) if x0.shape[0] else float("nan")

    def cache_id(self) -> str:
        """What the scores depend on (class and settings); used as a label-cache key."""
        settings = dict(sorted(self._settings().items()))
        return f"{type(self).__module__}.{type(self).__qualname__}{settings}"

    def _settings(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale={self.scale}, "
            f"success_threshold={self.success_threshold}, bound={self.spec is not None})"
        )


class VaderSentiment(TextReward):
    """Sentiment by VADER (``vaderSentiment``): the compound score in ``[-1, 1]``.

    The default ``success_threshold = 0.05`` is the VADER authors' cut for "positive" text
    (compound >= 0.05 positive, <= -0.05 negative, neutral between).
    """

    name = "vader"
    default_threshold = 0.05

    def __init__(
        self,
        tokenizer: str | Path | None = None,
        scale: float = 1.0,
        success_threshold: float | None = None,
    ):
        super().__init__(tokenizer, scale, success_threshold)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [self._analyzer.polarity_scores(t)["compound"] for t in texts]


class AfinnSentiment(TextReward):
    """Sentiment by the AFINN lexicon (``afinn``): ``tanh(total / saturation)`` in ``(-1, 1)``.

    ``total`` is the sum of the AFINN valences (integers in -5..5) of the words of the text, so
    the score is 0 for text without sentiment words and saturates (``tanh``) for long or very
    emotional text; ``saturation = 5`` maps one strongly valenced word (+-5) to +-0.76. A holdout
    scorer for sentiment steering: a lexicon and rules independent of VADER's.
    ``success_threshold = 0.0``: positive total valence.
    """

    name = "afinn"
    default_threshold = 0.0

    def __init__(
        self,
        tokenizer: str | Path | None = None,
        scale: float = 1.0,
        success_threshold: float | None = None,
        saturation: float = 5.0,
        emoticons: bool = False,
    ):
        super().__init__(tokenizer, scale, success_threshold)
        if not saturation > 0:
            raise ValueError(f"saturation={saturation} must be > 0")
        from afinn import Afinn

        self.saturation, self.emoticons = float(saturation), emoticons
        self._afinn = Afinn(language="en", emoticons=emoticons)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [math.tanh(self._afinn.score(t) / self.saturation) for t in texts]

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "saturation": self.saturation, "emoticons": self.emoticons}


class ProfanityToxicity(TextReward):
    """Toxicity by ``alt-profanity-check``: the probability that the text is offensive, ``[0, 1]``.

    A TF-IDF + linear SVM (calibrated) shipped with the package. ``scale=-1`` steers to
    low toxicity ("detoxify"), and success then means ``P(offensive) < success_threshold``
    (default 0.5); with ``scale > 0`` (red-teaming) success is ``P(offensive) > 0.5``.
    """

    name = "toxicity"
    default_threshold = 0.5

    def __init__(
        self,
        tokenizer: str | Path | None = None,
        scale: float = 1.0,
        success_threshold: float | None = None,
    ):
        super().__init__(tokenizer, scale, success_threshold)
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [float(p) for p in self._predict_prob(list(texts))] if texts else []


class WordListToxicity(TextReward):
    """Toxicity by the ``better-profanity`` word list (with its leetspeak variants).

    ``mode="any"`` (default): 1.0 when the text contains a listed word or phrase, else 0.0.
    ``mode="fraction"``: listed words and phrases per word of the text (``[0, 1]``; a phrase
    counts once). A holdout scorer for toxicity, independent of ``ProfanityToxicity``'s model.
    ``success_threshold = 0.0``: any listed word (``scale > 0``) or none (``scale < 0``).
    It is slow (about 50 ms per 64-token text on one CPU core): an evaluator, not a tilt.
    """

    name = "wordlist_toxicity"
    default_threshold = 0.0
    _CENSOR = "\x00"
    _WORD = re.compile(r"\S+")

    def __init__(
        self,
        tokenizer: str | Path | None = None,
        scale: float = 1.0,
        success_threshold: float | None = None,
        mode: str = "any",
    ):
        super().__init__(tokenizer, scale, success_threshold)
        if mode not in ("any", "fraction"):
            raise ValueError(f"mode={mode!r}: choose 'any' or 'fraction'")
        from better_profanity import Profanity

        self.mode = mode
        self._profanity = Profanity()  # a private instance: the module-level one is global state

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [self._score(t) for t in texts]

    def _score(self, text: str) -> float:
        censored = self._profanity.censor(text, self._CENSOR)
        flagged = censored.count(self._CENSOR * 4)  # each listed word becomes 4 censor chars
        if self.mode == "any":
            return float(flagged > 0)
        return min(1.0, flagged / max(1, len(self._WORD.findall(text))))

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "mode": self.mode}
