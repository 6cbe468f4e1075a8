"""Group-relative advantage estimators for RL with verifiable rewards.

Every estimator maps the rewards of ``G`` groups of ``n`` samples (the ``n`` responses drawn for
one prompt) to one advantage per sample, ``(G, n) → (G, n)``:

- ``"grpo"`` (:class:`GRPOAdvantage`): ``(r - mean) / (std + eps)`` within the group, with the
  *unbiased* standard deviation (Bessel's correction, ``torch.std(correction=1)``), as in GRPO
  (Shao et al., 2024, https://arxiv.org/abs/2402.03300), verl's ``compute_grpo_outcome_advantage``
  and TRL.
- ``"dr_grpo"`` (:class:`DrGRPOAdvantage`): ``r - mean``, no division by the standard deviation
  (Dr. GRPO, Liu et al., 2025, https://arxiv.org/abs/2503.20783).
- ``"rloo"`` (:class:`RLOOAdvantage`): ``r_i - mean_{j != i} r_j``, the leave-one-out baseline
  (Ahmadian et al., 2024, https://arxiv.org/abs/2402.14740). It equals
  ``n / (n - 1) * (r_i - mean)`` and needs ``n >= 2``.
- ``"reinforce_plus_plus_baseline"`` (:class:`ReinforcePlusPlusBaseline`): the group mean is
  subtracted, then the result is divided by its standard deviation over the whole batch
  (REINFORCE++-baseline, Hu et al., 2025, https://arxiv.org/abs/2501.03262; verl's
  ``reinforce_plus_plus_baseline``, OpenRLHF's ``reinforce_baseline``).

A group whose rewards are all equal (zero variance) carries no learning signal: every estimator
returns exactly ``0.0`` for it, never NaN. A user's estimator subclasses
:class:`AdvantageEstimator` and is selected by ``class_path`` like a loss.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Literal

import torch
from torch import Tensor

EstimatorName = Literal["grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"]


def _check_rewards(rewards: Tensor, min_group_size: int = 1) -> Tensor:
    """Validate ``(G, n)`` rewards (``n >= min_group_size``, finite); return them as floats.

    Raises:
        ValueError: on another shape, no group, too small groups, or NaN/infinite rewards.
    """
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape (G, n), got {type(rewards)}")
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must have shape (num_groups, n), got {tuple(rewards.shape)} "
            f"({rewards.ndim} dims); reshape flat rewards with rewards.view(-1, n)"
        )
    num_groups, group_size = rewards.shape
    if num_groups < 1:
        raise ValueError(f"rewards must hold at least one group, got shape {tuple(rewards.shape)}")
    if group_size < min_group_size:
        raise ValueError(
            f"this estimator needs at least {min_group_size} samples per group, "
            f"got n={group_size} (shape {tuple(rewards.shape)})"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite, got NaN or infinite values")
    return rewards


def _zero_constant_groups(advantages: Tensor, rewards: Tensor) -> Tensor:
    """Exact zeros for the groups whose rewards are all equal (``(G, n)`` both).

    ``r - mean`` of equal floats is not always exactly ``0.0`` (the mean is rounded), so constant
    groups are detected on the rewards themselves.
    """
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (G, 1)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: the group-normalised reward ``(r - mean) / (std + eps)``.

    The standard deviation is the unbiased one (``correction=1``), as in verl and TRL. A group of
    one sample has no standard deviation; its advantage is defined as ``0.0`` (like any group with
    zero reward variance).

    Args:
        rewards: Rewards shaped ``(G, n)``.
        eps: Added to the standard deviation; must be ``>= 0``.

    Returns:
        Advantages shaped ``(G, n)``.

    Raises:
        ValueError: On a bad shape, non-finite rewards or a negative ``eps``.

    Example:
        >>> grpo_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
        tensor([[ 0.7071, -0.7071],
                [ 0.0000,  0.0000]])

    """
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards = _check_rewards(rewards)
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    std = rewards.std(dim=1, correction=1, keepdim=True)  # (G, 1)
    # Constant groups divide 0 by eps (or by 0 when eps == 0): replaced by exact zeros below.
    advantages = (rewards - mean) / (std + eps)
    return _zero_constant_groups(advantages, rewards)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr. GRPO advantages: the reward minus the group mean, ``r - mean``.

    Args:
        rewards: Rewards shaped ``(G, n)``.

    Returns:
        Advantages shaped ``(G, n)``.

    Raises:
        ValueError: On a bad shape or non-finite rewards.

    Example:
        >>> dr_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        tensor([[ 0.7500, -0.2500, -0.2500, -0.2500]])

    """
    rewards = _check_rewards(rewards)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    return _zero_constant_groups(advantages, rewards)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO advantages: the reward minus the mean reward of the other ``n - 1`` samples.

    Args:
        rewards: Rewards shaped ``(G, n)`` with ``n >= 2``.

    Returns:
        Advantages shaped ``(G, n)``.

    Raises:
        ValueError: On a bad shape (including ``n < 2``) or non-finite rewards.

    Example:
        >>> rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
        tensor([[ 1.0000, -0.5000, -0.5000]])

    """
    rewards = _check_rewards(rewards, min_group_size=2)
    n = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)  # (G, n)
    return _zero_constant_groups(rewards - baseline, rewards)


class AdvantageEstimator(ABC):
    """Base class of advantage estimators: ``estimator(rewards (G, n)) -> advantages (G, n)``.

    Subclass it, take hyper-parameters as typed ``__init__`` arguments, implement ``__call__``
    and set :attr:`min_group_size`; then select it from YAML by ``class_path``
    (``rollout.advantage``) without editing dgpo.

    Example:
        >>> class CentredOnly(AdvantageEstimator):
        ...     min_group_size = 2
        ...     def __call__(self, rewards: Tensor) -> Tensor:
        ...         return rewards - rewards.mean(dim=1, keepdim=True)
        >>> CentredOnly()(torch.tensor([[1.0, 0.0]]))
        tensor([[ 0.5000, -0.5000]])
    """

    #: The smallest number of samples per prompt that gives a learning signal: 2 for group-relative
    #: estimators (with n = 1 every advantage is 0, or the estimator is undefined). The rollout
    #: callback rejects a smaller ``n`` before the first rollout.
    min_group_size: ClassVar[int] = 2

    @abstractmethod
    def __call__(self, rewards: Tensor) -> Tensor:
        """Advantages ``(G, n)`` of rewards ``(G, n)`` (``G`` prompts, ``n`` samples each)."""

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({params})"


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)


class GRPOAdvantage(AdvantageEstimator):
    """GRPO: ``(r - mean) / (std + eps)`` within each group (see :func:`grpo_advantages`).

    Args:
        eps: added to the unbiased standard deviation, ``>= 0``.

    Raises:
        ValueError: for a negative ``eps``.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = _check_eps(eps)

    def __call__(self, rewards: Tensor) -> Tensor:
        """Group-normalised rewards."""
        return grpo_advantages(rewards, eps=self.eps)


class DrGRPOAdvantage(AdvantageEstimator):
    """Dr. GRPO: ``r - mean`` within each group (see :func:`dr_grpo_advantages`)."""

    def __call__(self, rewards: Tensor) -> Tensor:
        """Group-centred rewards."""
        return dr_grpo_advantages(rewards)


class RLOOAdvantage(AdvantageEstimator):
    """RLOO: the reward minus the mean of the group's other rewards (:func:`rloo_advantages`)."""

    def __call__(self, rewards: Tensor) -> Tensor:
        """Leave-one-out advantages; needs ``n >= 2``."""
        return rloo_advantages(rewards)


class ReinforcePlusPlusBaseline(AdvantageEstimator):
    """REINFORCE++-baseline: subtract the group mean, then divide by the whole batch's std.

    ``A = (r - mean_group) / (std_batch + eps)``, the standard deviation unbiased and taken over
    all ``G · n`` centred rewards of the rollout (the callback calls the estimator once on the
    whole, gathered rollout, so "batch" is the global batch on several ranks). verl whitens the
    same quantity over tokens (a response counts once per token); here each response counts once.
    Groups of one sample have no group baseline (verl's rule): with ``n = 1`` this is REINFORCE++
    with the batch mean as baseline, ``(r - mean_batch) / (std_batch + eps)``.

    Args:
        eps: added to the batch standard deviation, ``>= 0``.

    Raises:
        ValueError: for a negative ``eps``.

    Example:
        >>> ReinforcePlusPlusBaseline(eps=0.0)(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[ 1.2247, -1.2247],
                [ 0.0000,  0.0000]])
    """

    min_group_size: ClassVar[int] = 1

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = _check_eps(eps)

    def __call__(self, rewards: Tensor) -> Tensor:
        """Group-centred, batch-normalised rewards."""
        rewards = _check_rewards(rewards)
        if rewards.shape[1] >= 2:
            centred = _zero_constant_groups(rewards - rewards.mean(dim=1, keepdim=True), rewards)
        else:  # no group baseline for a group of one
            constant = (rewards == rewards.flatten()[0]).all()
            centred = torch.where(constant, torch.zeros_like(rewards), rewards - rewards.mean())
        if centred.numel() < 2:
            return torch.zeros_like(rewards)
        # constant groups are exact zeros, and 0 / (std + eps) stays 0 (0 / 0 when all are: 0)
        std = centred.std(correction=1)
        return torch.where(centred == 0, torch.zeros_like(centred), centred / (std + self.eps))


ESTIMATORS: Mapping[str, type[AdvantageEstimator]] = MappingProxyType({
    "grpo": GRPOAdvantage,
    "dr_grpo": DrGRPOAdvantage,
    "rloo": RLOOAdvantage,
    "reinforce_plus_plus_baseline": ReinforcePlusPlusBaseline,
})
"""The built-in estimators by name (read-only)."""


def resolve_advantage(value: AdvantageEstimator | str) -> AdvantageEstimator:
    """The estimator of ``rollout.advantage``: an :class:`AdvantageEstimator` or a built-in name.

    jsonargparse falls back to the ``str`` branch of ``AdvantageEstimator | str`` when a
    ``class_path`` does not name an :class:`AdvantageEstimator` subclass, so that case arrives
    here as a string and gets its own error.

    Raises:
        ValueError: for an unknown name, or anything that is not an :class:`AdvantageEstimator`.

    Example:
        >>> resolve_advantage("rloo")
        RLOOAdvantage()
    """
    if isinstance(value, AdvantageEstimator):
        return value
    if not isinstance(value, str):
        raise ValueError(f"advantage must be a dgpo.advantages.AdvantageEstimator or one of "
                         f"{sorted(ESTIMATORS)}, got {type(value).__name__}")
    if value in ESTIMATORS:
        return ESTIMATORS[value]()
    if "class_path" in value or "." in value:
        raise ValueError(
            f"advantage {value!r} is not a dgpo.advantages.AdvantageEstimator: give the class_path "
            f"of an AdvantageEstimator subclass or a built-in name: {sorted(ESTIMATORS)}")
    raise ValueError(
        f"unknown advantage estimator {value!r}; valid estimators: {sorted(ESTIMATORS)}")


def compute_advantages(rewards: Tensor, estimator: AdvantageEstimator | str = "grpo",
                       eps: float = 1e-6) -> Tensor:
    """Compute group-relative advantages with the named (or given) estimator.

    Args:
        rewards: Rewards shaped ``(G, n)``: ``G`` prompts, ``n`` samples each. Flat rewards ordered
            prompt by prompt become this shape with ``rewards.view(-1, n)``.
        estimator: a built-in name (see the module docstring) or an :class:`AdvantageEstimator`.
        eps: the ``eps`` of ``"grpo"`` and ``"reinforce_plus_plus_baseline"`` when given by name.

    Returns:
        Advantages shaped ``(G, n)``, exactly ``0.0`` in groups whose rewards are all equal.

    Raises:
        ValueError: If ``estimator`` is unknown, or on bad rewards (see the estimators).

    Example:
        >>> compute_advantages(torch.tensor([[1.0, 0.0, 0.0]]), "rloo")
        tensor([[ 1.0000, -0.5000, -0.5000]])
    """
    if isinstance(estimator, str) and estimator == "grpo":
        return GRPOAdvantage(eps)(rewards)
    if isinstance(estimator, str) and estimator == "reinforce_plus_plus_baseline":
        return ReinforcePlusPlusBaseline(eps)(rewards)
    return resolve_advantage(estimator)(rewards)


def group_stats(correct: Tensor, rewards: Tensor | None = None) -> dict[str, float]:
    """Fractions of groups that carry no learning signal.

    Args:
        correct: Boolean tensor shaped ``(G, n)``: whether each sample's answer is correct.
        rewards: Optional rewards shaped ``(G, n)``. When the reward is not just correctness (a
            format bonus, say), a group can be all-correct and still have reward variance; pass
            the rewards to measure ``zero_variance`` on them.

    Returns:
        ``solve_all``: fraction of groups in which every sample is correct;
        ``solve_none``: fraction of groups in which no sample is correct;
        ``zero_variance``: fraction of groups whose rewards are all equal (their advantages are
        zero), or ``solve_all + solve_none`` when ``rewards`` is not given.

    Raises:
        ValueError: If ``correct`` is not a boolean ``(G, n)`` tensor, or ``rewards`` has another
            shape.

    Example:
        >>> correct = torch.tensor([[True, True], [False, True], [False, False], [True, False]])
        >>> group_stats(correct)
        {'solve_all': 0.25, 'solve_none': 0.25, 'zero_variance': 0.5}

    """
    if not isinstance(correct, Tensor) or correct.dtype != torch.bool:
        kind = correct.dtype if isinstance(correct, Tensor) else type(correct)
        raise ValueError(f"correct must be a torch.bool tensor of shape (G, n), got {kind}")
    if correct.ndim != 2 or correct.shape[0] < 1 or correct.shape[1] < 1:
        raise ValueError(f"correct must have shape (num_groups, n), got {tuple(correct.shape)}")
    solve_all = correct.all(dim=1).float().mean()
    solve_none = (~correct).all(dim=1).float().mean()
    if rewards is None:
        zero_variance = solve_all + solve_none
    else:
        if rewards.shape != correct.shape:
            raise ValueError(
                f"rewards must have the shape of correct {tuple(correct.shape)}, "
                f"got {tuple(rewards.shape)}"
            )
        zero_variance = (rewards == rewards[:, :1]).all(dim=1).float().mean()
    return {
        "solve_all": solve_all.item(),
        "solve_none": solve_none.item(),
        "zero_variance": zero_variance.item(),
    }
