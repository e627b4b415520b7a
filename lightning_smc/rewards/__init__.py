"""Rewards ``r(x0) -> [B]`` over token ids (the ``ls.Reward`` protocol) and their validation."""

from .base import Reward, check_reward_output

__all__ = ["Reward", "check_reward_output"]
