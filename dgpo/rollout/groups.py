"""What happens to a rollout's groups between scoring and training.

A *group* is one prompt's ``n`` samples. These are the steps the rollout callback applies to the
whole (gathered) rollout, identically on every rank:

- :func:`overlong_penalties`: DAPO's soft overlong punishment, reward shaping by length;
- :func:`select_groups`: dynamic sampling (DAPO), which keeps the groups whose rewards differ;
- :func:`correctness`: which samples count as solved, for ``solve_all``/``solve_none``.

:class:`Draw` holds one generation round, :class:`Batch` the groups selected for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from dgpo.data.prompt import PromptSample
from dgpo.distributed import concat_reward_outputs
from dgpo.rewards import RewardOutput
from dgpo.rollout.buffer import RolloutSample
from dgpo.rollout.engine import Completion


def overlong_penalties(lengths: Sequence[int], max_new_tokens: int, buffer: float,
                       penalty: float) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, eq. 13).

    With ``L = max_new_tokens`` and a buffer of ``B = round(buffer · L)`` tokens, a response of
    ``|y|`` tokens gets 0 up to ``L − B`` tokens, then ``−penalty · (|y| − (L − B)) / B``,
    linearly down to ``−penalty`` at ``L``.

    Args:
        lengths: response lengths in tokens.
        max_new_tokens: the generation limit ``L``.
        buffer: the penalised share of ``L``, in (0, 1] (DAPO: 4096 of 20480 tokens = 0.2).
        penalty: the penalty at ``L`` (DAPO: 1.0).

    Example:
        >>> overlong_penalties([10, 90, 95, 100], max_new_tokens=100, buffer=0.2, penalty=1.0)
        [0.0, -0.5, -0.75, -1.0]
    """
    tokens = max(1, round(buffer * max_new_tokens))
    start = max_new_tokens - tokens
    overs = [min(max(length - start, 0), tokens) for length in lengths]
    return [-penalty * over / tokens if over else 0.0 for over in overs]


def has_signal(scores: Tensor) -> Tensor:
    """``(G,)`` whether each group of a ``(G, n)`` score tensor has rewards that differ."""
    return (scores != scores[:, :1]).any(dim=1)


def select_groups(signal: Sequence[bool], wanted: int) -> tuple[list[int], int]:
    """Dynamic sampling: the groups to train on, in draw order, and how many carry no signal.

    The first ``wanted`` groups with signal are kept; when there are fewer, the batch is filled
    with the first groups without signal (zero advantages: they add no gradient, and keep the
    batch's size, hence the mini-batch arithmetic, valid).

    Args:
        signal: for every generated group, in draw order, whether its rewards differ.
        wanted: the number of groups to train on (``rollout_batch_size``).

    Returns:
        The indices of the groups to train on, and how many of them were filled in without
        signal.

    Example:
        >>> select_groups([False, True, False, True], wanted=3)
        ([1, 3, 0], 1)
    """
    kept = [index for index, has in enumerate(signal) if has][:wanted]
    filler = [index for index, has in enumerate(signal) if not has][:wanted - len(kept)]
    if len(kept) + len(filler) < wanted:
        raise ValueError(f"{len(signal)} generated groups cannot fill a batch of {wanted}")
    return kept + filler, len(filler)


def correctness(correct: Sequence[bool] | None, scores: Tensor) -> Tensor | None:
    """Per-sample correctness as a bool tensor: the reward's own, else None.

    A reward without a notion of correctness (a dense score) has no solved or unsolved groups;
    ``scores > 0`` would call a group with rewards ``[0.05, 0.06]`` solved by all.
    """
    if correct is None:
        return None
    return torch.tensor(list(correct), dtype=torch.bool).view_as(scores)


@dataclass
class Draw:
    """One generation round: its prompts and, per sample, what generation and scoring gave.

    Built per engine shard, then concatenated over the engines (:meth:`concat`) into the whole
    draw, the same on every rank. ``scores`` are the reward's; ``samples[i].reward`` is shaped.
    """

    prompts: list[PromptSample]
    samples: list[RolloutSample]
    completions: list[Completion]
    reward_scores: list[float]
    reward: RewardOutput
    sync: dict[str, float] | None

    def scores(self) -> torch.Tensor:
        """``(G, n)`` the reward's (unshaped) scores, for the dynamic-sampling filter."""
        return torch.tensor(self.reward_scores).view(len(self.prompts), -1)

    @staticmethod
    def concat(parts: list[Draw]) -> Draw:
        """The whole draw from every engine's shard, in engine order."""
        syncs = [part.sync for part in parts if part.sync is not None]
        sync = None
        if syncs:
            count = sum(d["count"] for d in syncs)
            total = sum(d["sum"] for d in syncs)
            sync = {"max": max(d["max"] for d in syncs), "sum": total, "count": count,
                    "mean": total / max(count, 1)}
        return Draw(parts[0].prompts, [s for p in parts for s in p.samples],
                     [c for p in parts for c in p.completions],
                     [x for p in parts for x in p.reward_scores],
                     concat_reward_outputs([p.reward for p in parts]), sync)


@dataclass
class Batch:
    """The groups trained on: prompts, samples, completions and their reward output."""

    prompts: list[PromptSample]
    samples: list[RolloutSample]
    completions: list[Completion]
    reward: RewardOutput

    @staticmethod
    def select(draws: list[Draw], groups: list[int] | None, n: int) -> Batch:
        """The groups ``groups`` (indices over all draws' groups; None: the first draw's)."""
        if groups is None:
            draw = draws[0]
            return Batch(draw.prompts, draw.samples, draw.completions, draw.reward)
        prompts = [p for d in draws for p in d.prompts]
        samples = [s for d in draws for s in d.samples]
        completions = [c for d in draws for c in d.completions]
        reward = concat_reward_outputs([d.reward for d in draws])
        rows = [group * n + k for group in groups for k in range(n)]
        details = [reward.details[i] for i in rows] if reward.details else []
        correct = [reward.correct[i] for i in rows] if reward.correct is not None else None
        picked = [replace(samples[row], group=index // n) for index, row in enumerate(rows)]
        picked_completions = [replace(completions[row], prompt_index=index // n)
                              for index, row in enumerate(rows)]
        return Batch([prompts[g] for g in groups], picked, picked_completions,
                      RewardOutput([reward.scores[i] for i in rows], details, {}, {}, correct))


@dataclass
class RolloutRecord:
    """The last rollout, for callbacks that report on it (e.g. the completions table).

    Attributes:
        epoch: the epoch it was generated for.
        prompts: the rollout's prompts.
        completions: ``n`` completions per prompt, prompt-major.
        rewards: one reward per completion.
        advantages: one advantage per completion.
        details: the reward's per-completion details (``parsed_answer``, ``status``), if any.
    """

    epoch: int
    prompts: list[PromptSample]
    completions: list[Completion]
    rewards: list[float]
    advantages: list[float]
    details: list[dict[str, Any]] = field(default_factory=list)
