"""The reward contract.

``reward(x0: LongTensor [B, L]) -> Tensor [B]``: a scalar score per complete sequence. A
differentiable reward additionally accepts soft one-hot inputs ``[B, L, V]`` (for SMCgrad).
Rewards are validated on every call by ``check_reward_output``: the wrong shape or a NaN is an
error naming the reward, never a silently wrong weight.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["BaseReward", "Reward", "check_reward_output"]


@runtime_checkable
class Reward(Protocol):
    def __call__(self, x0: Tensor) -> Tensor: ...


class BaseReward:
    """Base class of the packaged rewards: what configs name as ``class_path`` for a reward.

    Any callable ``x0 [B, L] -> [B]`` is a ``Reward`` in Python; subclass ``BaseReward`` to make
    your own reward selectable from YAML configs (``reward: {class_path: my.Reward}``)."""

    differentiable: bool = False

    def __call__(self, x0: Tensor) -> Tensor:
        raise NotImplementedError


def check_reward_output(reward: object, value: Tensor, batch: int) -> Tensor:
    """``value`` as float64 ``[batch]``, or a ``ValueError`` that names the reward and the problem."""
    name = getattr(reward, "__name__", type(reward).__name__)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"reward {name} must return a torch.Tensor of shape [{batch}], got {type(value).__name__}"
        )
    if value.shape != (batch,):
        raise ValueError(
            f"reward {name} returned shape {tuple(value.shape)}; it must return one score per sequence, shape [{batch}]"
        )
    if not torch.isfinite(value).all():
        raise ValueError(
            f"reward {name} returned a non-finite score (NaN or inf); rewards must be finite"
        )
    return value.to(torch.float64)
