"""Weighted sum of several rewards."""

import math
from collections.abc import Sequence
from typing import Any

from dgpo.rewards.base import (
    Reward,
    RewardFunction,
    RewardOutput,
    call_reward,
    close_reward,
    start_reward,
)


def _component_names(rewards: Sequence[RewardFunction]) -> list[str]:
    """Name each reward by its class (or function) name, suffixed by its index when repeated."""
    names = [getattr(r, "__name__", type(r).__name__) for r in rewards]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


class WeightedSumReward(Reward):
    """Scores each completion with several rewards and returns their weighted sum.

    The output combines the sub-rewards' outputs:

    - ``scores``: ``Σ weight · score`` per completion;
    - ``metrics``: each sub-reward's metrics under the prefix ``<name>/`` (the reward's class
      name, with ``_<index>`` appended when two share a class), with their declared
      reductions, plus ``<name>/reward_mean`` (the mean of that component, reduced as a mean);
    - ``details``: per sample, the entry of the first sub-reward that has details
      (``parsed_answer``, ``status``, ...), with ``reward`` set to the weighted sum and
      ``components`` mapping each sub-reward's name to its score;
    - ``correct``: that of the first sub-reward that reports correctness (None if none does).

    Each sub-reward's output is checked as :func:`~dgpo.rewards.call_reward` checks it (the
    time limit applies to the whole weighted sum, not to each part).

    Args:
        rewards: The rewards to combine; any :class:`~dgpo.rewards.base.RewardFunction`.
        weights: One weight per reward; ``None`` weighs each reward 1.

    Raises:
        ValueError: If ``rewards`` is empty or holds something not callable, or ``weights`` does
            not have one finite number per reward.

    Example:
        >>> class Const:
        ...     def __init__(self, value):
        ...         self.value = value
        ...     def __call__(self, completions, answers, **columns):
        ...         return [self.value] * len(completions)
        >>> WeightedSumReward([Const(1.0), Const(2.0)], weights=[0.5, 0.25])(["a"], ["b"]).scores
        [1.0]

    """

    def __init__(self, rewards: list[RewardFunction], weights: list[float] | None = None) -> None:
        if not rewards:
            raise ValueError(f"rewards must be a non-empty list of rewards, got {rewards!r}")
        for index, reward in enumerate(rewards):
            if not callable(reward):
                raise ValueError(f"rewards[{index}] must be callable, got {reward!r}")
        if weights is None:
            weights = [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ValueError(
                f"weights has {len(weights)} entries ({weights!r}) but there are {len(rewards)} "
                "rewards; give one weight per reward, or None to weigh each by 1"
            )
        for index, weight in enumerate(weights):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"weights[{index}] must be a finite number, got {weight!r}")
            if not math.isfinite(weight):
                raise ValueError(f"weights[{index}] must be a finite number, got {weight!r}")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.names = _component_names(self.rewards)

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> RewardOutput:
        """Weighted sum of the sub-rewards (see :class:`~dgpo.rewards.base.RewardFunction`).

        Raises:
            ValueError: If a sub-reward's output breaks the contract (naming the sub-reward).

        """
        parts = [call_reward(reward, completions, answers, columns, timeout_s=None)
                 for reward in self.rewards]
        totals = [sum(w * part.scores[i] for w, part in zip(self.weights, parts, strict=True))
                  for i in range(len(completions))]
        metrics: dict[str, float] = {}
        reductions: dict[str, Any] = {}
        for name, part in zip(self.names, parts, strict=True):
            metrics.update({f"{name}/{key}": value for key, value in part.metrics.items()})
            reductions.update({f"{name}/{key}": how for key, how in part.reductions.items()})
            metrics[f"{name}/reward_mean"] = sum(part.scores) / max(len(part.scores), 1)
            reductions[f"{name}/reward_mean"] = "mean"
        primary = next((p.details for p in parts if p.details), [{} for _ in totals])
        details = [
            {**primary[i], "reward": total,
             "components": {n: p.scores[i] for n, p in zip(self.names, parts, strict=True)}}
            for i, total in enumerate(totals)
        ]
        correct = next((p.correct for p in parts if p.correct is not None), None)
        return RewardOutput(totals, details, metrics, reductions, correct)

    def start(self) -> None:
        """Start every sub-reward that has a ``start`` method."""
        for reward in self.rewards:
            start_reward(reward)

    def close(self) -> None:
        """Close every sub-reward that has a ``close`` method."""
        for reward in self.rewards:
            close_reward(reward)
