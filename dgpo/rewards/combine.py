"""Weighted sum of several rewards."""

import math
from collections.abc import Sequence
from typing import Any

from dgpo.rewards.base import Reward, RewardFunction


def _component_names(rewards: Sequence[RewardFunction]) -> list[str]:
    """Name each reward by its class (or function) name, suffixed by its index when repeated."""
    names = [getattr(r, "__name__", type(r).__name__) for r in rewards]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


class WeightedSumReward(Reward):
    """Scores each completion with several rewards and returns their weighted sum.

    ``metrics()`` merges the sub-rewards' metrics under the prefix ``<name>/`` (the reward's
    class name, with ``_<index>`` appended when two share a class) and adds
    ``<name>/reward_mean``, the mean of that component over the last batch.

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
        >>> WeightedSumReward([Const(1.0), Const(2.0)], weights=[0.5, 0.25])(["a"], ["b"])
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
        self._components: list[list[float]] = []
        self._totals: list[float] = []

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """Weighted sum of the sub-rewards (see :class:`~dgpo.rewards.base.RewardFunction`).

        Raises:
            ValueError: If a sub-reward does not return one value per completion.

        """
        components = []
        for name, reward in zip(self.names, self.rewards, strict=True):
            values = [float(v) for v in reward(completions, answers, **columns)]
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {name} returned {len(values)} values for {len(completions)} "
                    "completions; expected one per completion"
                )
            components.append(values)
        self._components = components
        self._totals = [
            sum(w * values[i] for w, values in zip(self.weights, components, strict=True))
            for i in range(len(completions))
        ]
        return list(self._totals)

    def metrics(self) -> dict[str, float]:
        """Return each sub-reward's metrics and mean from the last call, prefixed by its name."""
        merged: dict[str, float] = {}
        for name, reward, values in zip(self.names, self.rewards, self._components, strict=False):
            sub_metrics = getattr(reward, "metrics", None)
            if callable(sub_metrics):
                merged.update({f"{name}/{key}": value for key, value in sub_metrics().items()})
            merged[f"{name}/reward_mean"] = sum(values) / max(len(values), 1)
        return merged

    def details(self) -> list[dict[str, Any]]:
        """Per-sample information from the last call.

        Returns:
            One dict per sample: the entry of the first sub-reward that has details
            (``parsed_answer``, ``status``, ...), with ``reward`` set to the weighted sum and
            ``components`` mapping each sub-reward's name to its value.

        """
        primary: list[dict[str, Any]] = []
        for reward in self.rewards:
            sub_details = getattr(reward, "details", None)
            primary = sub_details() if callable(sub_details) else []
            if len(primary) == len(self._totals):
                break
        else:
            primary = [{} for _ in self._totals]
        return [
            {
                **primary[i],
                "reward": total,
                "components": {n: c[i] for n, c in zip(self.names, self._components, strict=True)},
            }
            for i, total in enumerate(self._totals)
        ]

    def close(self) -> None:
        """Close every sub-reward that has a ``close`` method."""
        for reward in self.rewards:
            close = getattr(reward, "close", None)
            if callable(close):
                close()
