"""Group-relative advantage estimators for RL with verifiable rewards.

Every estimator maps the rewards of ``G`` groups of ``n`` samples (the ``n`` responses drawn for
one prompt) to one advantage per sample:

- ``"grpo"``: ``(r - mean) / (std + eps)`` within the group, with the *unbiased* standard deviation
  (Bessel's correction, ``torch.std(correction=1)``), as in GRPO (Shao et al., 2024,
  https://arxiv.org/abs/2402.03300), verl's ``compute_grpo_outcome_advantage`` and TRL.
- ``"dr_grpo"``: ``r - mean``, no division by the standard deviation (Dr. GRPO, Liu et al., 2025,
  https://arxiv.org/abs/2503.20783).
- ``"rloo"``: ``r_i - mean_{j != i} r_j``, the leave-one-out baseline (Ahmadian et al., 2024,
  https://arxiv.org/abs/2402.14740). It equals ``n / (n - 1) * (r_i - mean)`` and needs ``n >= 2``.

A group whose rewards are all equal (zero variance, which includes every group of one sample)
carries no learning signal: all three estimators return exactly ``0.0`` for it, never NaN.
"""

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo"]


def _check_rewards(rewards: Tensor, min_group_size: int = 1) -> Tensor:
    """Validate a ``(G, n)`` reward tensor and return it as a floating tensor.

    Args:
        rewards: Rewards shaped ``(G, n)``; integer and boolean tensors are converted to float.
        min_group_size: The smallest ``n`` the estimator accepts.

    Returns:
        The rewards as a floating tensor of shape ``(G, n)``.

    Raises:
        ValueError: If ``rewards`` is not a 2-D tensor with at least one group of at least
            ``min_group_size`` samples, or holds NaN or infinite values.

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
    """Set the advantages of groups whose rewards are all equal to exactly zero.

    ``r - mean`` of equal floats is not always exactly ``0.0`` in floating point (the mean is
    rounded), so constant groups are detected on the rewards themselves.

    Args:
        advantages: Advantages shaped ``(G, n)``.
        rewards: Rewards shaped ``(G, n)``.

    Returns:
        The advantages, with the rows of constant groups set to ``0.0``.

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


ESTIMATORS: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
)
"""The built-in estimators by name (read-only; ``"grpo"`` with its default ``eps``)."""


def compute_advantages(
    rewards: Tensor, estimator: AdvantageEstimator = "grpo", eps: float = 1e-6
) -> Tensor:
    """Compute group-relative advantages with the named estimator.

    Args:
        rewards: Rewards shaped ``(G, n)``: ``G`` prompts, ``n`` samples each. Flat rewards ordered
            prompt by prompt become this shape with ``rewards.view(-1, n)``.
        estimator: ``"grpo"``, ``"dr_grpo"`` or ``"rloo"`` (see the module docstring).
        eps: Added to the standard deviation by ``"grpo"``; the other estimators do not use it.

    Returns:
        Advantages shaped ``(G, n)``, exactly ``0.0`` in groups whose rewards are all equal.

    Raises:
        ValueError: If ``estimator`` is unknown, or on bad rewards (see the estimators).

    Example:
        >>> compute_advantages(torch.tensor([[1.0, 0.0, 0.0]]), "rloo")
        tensor([[ 1.0000, -0.5000, -0.5000]])

    """
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; valid estimators: {sorted(ESTIMATORS)}"
        )
    if estimator == "grpo":  # the only estimator with an eps
        return grpo_advantages(rewards, eps=eps)
    return ESTIMATORS[estimator](rewards)


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
