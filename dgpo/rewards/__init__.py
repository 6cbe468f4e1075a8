"""Rewards for RL with verifiable rewards: the contract, math-verify, and combinations."""

from dgpo.rewards.base import (
    DEFAULT_REDUCTION,
    DEFAULT_REWARD_TIMEOUT_S,
    REDUCTIONS,
    Reduction,
    Reward,
    RewardFunction,
    RewardOutput,
    SampleStatus,
    call_reward,
    close_reward,
    start_reward,
)
from dgpo.rewards.combine import WeightedSumReward
from dgpo.rewards.extract import extract_boxed, extract_last_number
from dgpo.rewards.math_verify import MathVerifyReward

__all__ = [
    "DEFAULT_REDUCTION",
    "DEFAULT_REWARD_TIMEOUT_S",
    "REDUCTIONS",
    "MathVerifyReward",
    "Reduction",
    "Reward",
    "RewardFunction",
    "RewardOutput",
    "SampleStatus",
    "WeightedSumReward",
    "call_reward",
    "close_reward",
    "extract_boxed",
    "extract_last_number",
    "start_reward",
]
