"""Rewards for RL with verifiable rewards: the contract, math-verify, and combinations."""

from dgpo.rewards.base import Reward, RewardFunction, SampleStatus
from dgpo.rewards.combine import WeightedSumReward
from dgpo.rewards.extract import extract_boxed, extract_last_number
from dgpo.rewards.math_verify import MathVerifyReward

__all__ = [
    "MathVerifyReward",
    "Reward",
    "RewardFunction",
    "SampleStatus",
    "WeightedSumReward",
    "extract_boxed",
    "extract_last_number",
]
