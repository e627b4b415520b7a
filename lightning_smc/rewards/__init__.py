"""Rewards ``r(x0) -> [B]`` over token ids (the ``ls.Reward`` protocol) and their validation.

``base``     the ``Reward`` protocol and ``check_reward_output`` (shape ``[B]``, finite, float64)
``text``     ``TextReward`` (decode with the diffusion model's tokenizer, score strings):
             ``VaderSentiment``, ``AfinnSentiment`` (sentiment), ``ProfanityToxicity``,
             ``WordListToxicity`` (toxicity)
``hf``       ``HFClassifierReward``: any Hugging Face sequence classifier
``learned``  ``LearnedReward``: a differentiable reward on the model's vocabulary (ids or soft
             one-hots ``[B, L, V]``), HF-style ``save_pretrained`` / ``from_pretrained``;
             ``PretrainedLearnedReward(path)`` loads one from YAML configs

``image``    ``VQImageReward`` (decode token grids through the VQ, score images): ``ClassReward``
             (differentiable), ``HoldoutClassReward``, ``JpegCompressibility``,
             ``JpegIncompressibility``; ``image_adapters``: ``ImageRewardScore``,
             ``LaionAesthetic``, ``HPSv2Score`` (local weights only). Imported on first use
             (they need diffusers).

A reward with ``differentiable = True`` also accepts soft one-hot inputs (SMCgrad).
"""

import importlib

from .base import BaseReward, Reward, check_reward_output
from .hf import HFClassifierReward
from .learned import (
    EMBEDDED_SENTIMENT_REWARD,
    LearnedReward,
    LearnedRewardConfig,
    PretrainedLearnedReward,
)
from .text import (
    EMBEDDED_MODEL,
    AfinnSentiment,
    ProfanityToxicity,
    TextReward,
    VaderSentiment,
    WordListToxicity,
    resolve_tokenizer,
)

#: image rewards, imported on first access (``lightning_smc.rewards.ClassReward``)
_LAZY = {
    **dict.fromkeys(
        ("ClassReward", "HoldoutClassReward", "JpegCompressibility", "JpegIncompressibility"),
        "image",
    ),
    "VQImageReward": "image",
    **dict.fromkeys(("HPSv2Score", "ImageRewardScore", "LaionAesthetic"), "image_adapters"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "EMBEDDED_MODEL",
    "EMBEDDED_SENTIMENT_REWARD",
    "AfinnSentiment",
    "BaseReward",
    "HFClassifierReward",
    "LearnedReward",
    "LearnedRewardConfig",
    "PretrainedLearnedReward",
    "ProfanityToxicity",
    "Reward",
    "TextReward",
    "VaderSentiment",
    "WordListToxicity",
    "check_reward_output",
    "resolve_tokenizer",
]
