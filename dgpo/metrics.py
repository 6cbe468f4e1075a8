r"""Evaluation metrics over ``k`` sampled answers per problem: Avg@k, unbiased Pass@k, Maj@k.

Each metric takes the per-sample correctness of a batch of problems, a ``(P, n)`` tensor (``P``
problems, ``n`` samples each; bool, or floats in [0, 1]), and keeps only sums and counts as
states with ``dist_reduce_fx="sum"``: under DDP/FSDP, ``compute()`` sums the states of every rank
before dividing, so the result is the one a single rank would get on all the problems.

- :class:`AvgAtK`: the mean accuracy over the ``n`` samples of a problem, averaged over problems
  (the paper's Avg@k, also called mean@k; it estimates Pass@1).
- :class:`PassAtK`: the unbiased estimator of Chen et al. (2021, `arXiv 2107.03374
  <https://arxiv.org/abs/2107.03374>`_) of the probability that at least one of ``k`` samples is
  correct, from ``c`` correct out of ``n >= k`` samples, averaged over problems.
- :class:`MajAtK`: majority-vote accuracy: whether the most frequent answer of the ``n`` samples
  is correct.

Example:
    >>> correct = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    >>> AvgAtK()(correct).item(), PassAtK(2)(correct).item()
    (0.25, 0.41666666666666663)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased Pass@k of one problem: :math:`1 - \binom{n-c}{k} / \binom{n}{k}`.

    Computed as :math:`1 - \prod_{i=n-c+1}^{n} (1 - k/i)` (Chen et al., 2021), which needs no
    large binomial coefficients.

    Args:
        n: Samples drawn (>= 1).
        c: Correct samples, ``0 <= c <= n``.
        k: Samples the metric is about, ``1 <= k <= n``.

    Returns:
        The probability that a random subset of ``k`` of the ``n`` samples holds a correct one.

    Raises:
        ValueError: If ``n``, ``c`` or ``k`` is out of range.

    Example:
        >>> pass_at_k(n=4, c=1, k=2)
        0.5

    """
    _check_k(k, n)
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got c={c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_per_problem(correct: Tensor, k: int) -> Tensor:
    """Unbiased Pass@k of each row of a ``(P, n)`` correctness tensor, in float64.

    Args:
        correct: ``(P, n)`` correctness (bool, or 0/1 values).
        k: Samples the metric is about, ``1 <= k <= n``.

    Returns:
        ``(P,)`` float64 Pass@k per problem.

    Raises:
        ValueError: If ``correct`` is not 2-D or ``k`` is not in ``[1, n]``.

    """
    correct = _check_correct(correct)
    n = correct.shape[1]
    _check_k(k, n)
    c = (correct > 0.5).sum(dim=1, keepdim=True)  # (P, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=correct.device)  # (n,)
    factors = torch.where(i > n - c, 1.0 - k / i, torch.ones_like(i))  # (P, n)
    return 1.0 - factors.prod(dim=1).clamp(min=0.0)  # n - c < k gives a factor 0: Pass@k = 1


def answer_ids(answers: Sequence[Sequence[str | None]]) -> Tensor:
    """Number the distinct answers of each problem, for :class:`MajAtK`.

    Answers are compared as strings with whitespace removed; ``None`` (no answer) becomes -1.

    Args:
        answers: ``P`` lists of ``n`` extracted answers (e.g. the ``parsed_answer`` of the
            details of :class:`~dgpo.rewards.MathVerifyReward`'s output).

    Returns:
        ``(P, n)`` long tensor; equal ids in a row mean equal answers.

    Raises:
        ValueError: If the rows do not all have the same length.

    Example:
        >>> answer_ids([["1/2", "3", "1 / 2", None]]).tolist()
        [[0, 1, 0, -1]]

    """
    rows = []
    for row in answers:
        seen: dict[str, int] = {}
        keys = [None if a is None else "".join(str(a).split()) for a in row]
        rows.append([-1 if key is None else seen.setdefault(key, len(seen)) for key in keys])
    if len({len(row) for row in rows}) > 1:
        raise ValueError(f"every problem needs the same number of answers, got {rows}")
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)


class _ProblemMean(Metric):
    """A mean over problems of a per-problem score: ``total`` and ``problems`` summed over ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    total: Tensor
    problems: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, scores: Tensor) -> None:
        self.total += scores.to(torch.float64).sum()
        self.problems += scores.numel()

    def compute(self) -> Tensor:
        """Return the mean score over all problems seen (NaN before any update)."""
        return self.total / self.problems


class AvgAtK(_ProblemMean):
    """Avg@k: mean accuracy over each problem's ``k`` samples, averaged over problems.

    Example:
        >>> metric = AvgAtK()
        >>> metric.update(torch.tensor([[True, False, False, False], [True, True, True, True]]))
        >>> metric.compute().item()
        0.625

    """

    def update(self, correct: Tensor) -> None:
        """Add a batch.

        Args:
            correct: ``(P, k)`` correctness of ``k`` samples of ``P`` problems (bool, or scores
                in [0, 1] for partial credit).

        Raises:
            ValueError: If ``correct`` is not 2-D.

        """
        self._add(_check_correct(correct).mean(dim=1))


class PassAtK(_ProblemMean):
    r"""Unbiased Pass@k from ``n >= k`` samples per problem, averaged over problems.

    Per problem with ``c`` correct of ``n`` samples: :math:`1 - \binom{n-c}{k}/\binom{n}{k}`,
    computed in float64 by the product form (see :func:`pass_at_k`). Float correctness is
    thresholded at 0.5.

    Args:
        k: Samples the metric is about (>= 1); every update needs ``n >= k`` samples per problem.
        **kwargs: Passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).

    Raises:
        ValueError: If ``k < 1``, or an update has fewer than ``k`` samples per problem.

    Example:
        >>> PassAtK(k=2)(torch.tensor([[True, False, False, False]])).item()
        0.5

    """

    def __init__(self, k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = k

    def update(self, correct: Tensor) -> None:
        """Add a batch.

        Args:
            correct: ``(P, n)`` correctness of ``n >= k`` samples of ``P`` problems.

        Raises:
            ValueError: If ``correct`` is not 2-D or ``n < k``.

        """
        self._add(pass_at_k_per_problem(correct, self.k))


class MajAtK(_ProblemMean):
    """Maj@k: accuracy of the majority answer of each problem's ``k`` samples.

    The samples vote with their answer ids (see :func:`answer_ids`); samples without an answer
    (id -1) do not vote, and a problem without any answer counts as wrong. A tie between several
    most frequent answers scores the fraction of them that is correct (the expected accuracy of
    breaking the tie at random), so the result does not depend on the order of the samples.

    Example:
        >>> correct = torch.tensor([[True, True, False, False, False]])
        >>> ids = torch.tensor([[0, 0, 1, 1, 2]])  # answers "a", "a", "b", "b", "c"
        >>> MajAtK()(correct, ids).item()  # "a" and "b" tie: one of the two is right
        0.5

    """

    def update(self, correct: Tensor, answers: Tensor) -> None:
        """Add a batch.

        Args:
            correct: ``(P, k)`` correctness of ``k`` samples of ``P`` problems.
            answers: ``(P, k)`` answer ids (equal ids: equal answers; -1: no answer).

        Raises:
            ValueError: If the shapes differ or ``correct`` is not 2-D.

        """
        correct = _check_correct(correct) > 0.5
        if answers.shape != correct.shape:
            raise ValueError(f"answers must have the shape of correct {tuple(correct.shape)}, "
                             f"got {tuple(answers.shape)}")
        answers = answers.to(correct.device).long()
        low, high = (int(answers.min()), int(answers.max())) if answers.numel() else (0, 0)
        if low < -1 or high >= answers.shape[1]:
            raise ValueError(f"answer ids must be in [-1, {answers.shape[1]}), got values from "
                             f"{low} to {high}; see answer_ids()")
        valid = answers >= 0
        slots = answers.clamp(min=0)  # (P, k): vote slot of each sample
        votes = torch.zeros_like(answers).scatter_add_(1, slots, valid.long())  # (P, k)
        right = torch.zeros_like(answers).scatter_add_(1, slots, (valid & correct).long())
        top = votes.max(dim=1, keepdim=True).values  # (P, 1)
        winners = (votes == top) & (top > 0)  # answer ids tied for the most votes
        # an answer's samples agree on correctness; `right > 0` marks a correct answer
        score = (winners & (right > 0)).sum(1) / winners.sum(1).clamp(min=1)
        self._add(score)


def _check_correct(correct: Tensor) -> Tensor:
    """Return ``correct`` as float64 after checking it is ``(P, n)`` with ``n >= 1``."""
    if correct.dim() != 2 or correct.shape[1] == 0:
        raise ValueError(f"correct must have shape (problems, samples) with samples >= 1, got "
                         f"{tuple(correct.shape)}")
    return correct.to(torch.float64)


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 samples, got n={n}")
    if k > n:
        raise ValueError(f"Pass@k needs k <= n samples per problem, got k={k} > n={n}; "
                         f"sample at least k answers per problem or lower k")
