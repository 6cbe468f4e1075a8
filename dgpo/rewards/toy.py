"""A dense toy reward for demos and smoke runs on random models (no answer checking)."""

from __future__ import annotations

from typing import Any

from dgpo.rewards.base import Reward


class DigitFractionReward(Reward):
    """The fraction of digit characters in a completion, in [0, 1].

    A tiny random model never solves arithmetic, so a correctness reward gives it zero advantages
    and no updates. This reward varies between samples of one group whatever the model, so the
    group-relative advantages are non-zero and the policy moves: enough for smoke runs, tests and
    the CPU-sized figure notebooks on ``builtin:tiny-qwen2``. It ignores the gold answers.

    Example:
        >>> DigitFractionReward()(["12ab", "none"], ["3", "3"]).scores
        [0.5, 0.0]
    """

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """Score each completion by its share of digit characters."""
        return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]
