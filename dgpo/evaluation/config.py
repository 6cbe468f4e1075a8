"""How evaluation samples and scores: ``k`` answers per problem, their sampling and the reward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dgpo.settings import check_known_keys

EXTRACTIONS = ("boxed", "lenient")


@dataclass
class EvalConfig:
    r"""Sampling and scoring settings of validation and test (``--model.evaluation.<field>``).

    The defaults are the paper's: 32 samples per problem at temperature 0.6 and top-p 0.95, a long
    maximum length, answers read from the last ``\boxed{}`` and checked by math-verify.

    Raises:
        ValueError: If a field is out of range, or a Pass@k asks for more than ``k`` samples.

    Example:
        >>> EvalConfig(k=4).metric_names
        ['avg@4', 'pass@1', 'pass@4', 'maj@4']
        >>> EvalConfig(k=4, pass_k=[2]).metric_names
        ['avg@4', 'pass@2', 'maj@4']

    """

    k: int = 32
    """Samples per problem: the k of Avg@k and Maj@k."""
    pass_k: list[int] | None = None
    """The k values of the reported Pass@k, each <= ``k``; None means ``[1, k]``."""
    temperature: float = 0.6
    """Sampling temperature (0: greedy, then every sample is the same)."""
    top_p: float = 0.95
    """Nucleus sampling threshold, in (0, 1]."""
    max_new_tokens: int = 8192
    """Longest response, in tokens."""
    seed: int = 0
    """Base seed of sampling; every validation uses the same seeds."""
    extraction: Literal["boxed", "lenient"] = "boxed"
    """``"boxed"``: the answer is the last ``\\boxed{}``; ``"lenient"``: else the last number."""
    reward_workers: int = 2
    """Processes that run math-verify."""
    reward_timeout_s: float = 5.0
    """Seconds allowed to check one answer."""

    def __post_init__(self) -> None:
        for name in ("k", "max_new_tokens", "reward_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be an integer >= 1, got {value!r}")
        if self.pass_k is not None:
            bad = [j for j in self.pass_k if isinstance(j, bool) or not isinstance(j, int)
                   or not 1 <= j <= self.k]
            if bad or not self.pass_k:
                raise ValueError(f"EvalConfig.pass_k must be a non-empty list of integers in "
                                 f"[1, k={self.k}] (Pass@k needs k <= samples), got {self.pass_k}")
            self.pass_k = sorted(set(self.pass_k))
        if not self.temperature >= 0:
            raise ValueError(f"EvalConfig.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"EvalConfig.seed must be an integer >= 0, got {self.seed!r}")
        if self.extraction not in EXTRACTIONS:
            raise ValueError(f"EvalConfig.extraction must be one of {list(EXTRACTIONS)}, got "
                             f"{self.extraction!r}")
        if not self.reward_timeout_s > 0:
            raise ValueError(f"EvalConfig.reward_timeout_s must be > 0, got "
                             f"{self.reward_timeout_s!r}")

    @property
    def pass_ks(self) -> list[int]:
        """The k values of Pass@k (``pass_k``, or ``[1, k]`` when it is None)."""
        return list(self.pass_k) if self.pass_k is not None else sorted({1, self.k})

    @property
    def metric_names(self) -> list[str]:
        """Names of the accuracy metrics, in reporting order."""
        return [f"avg@{self.k}", *[f"pass@{j}" for j in self.pass_ks], f"maj@{self.k}"]

    @classmethod
    def build(cls, value: EvalConfig | Mapping[str, Any] | None) -> EvalConfig:
        """Return ``value`` as an :class:`EvalConfig`; accepts a dict of fields (hparams) or None.

        Raises:
            ValueError: On an unknown field.

        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        check_known_keys(cls, value, "evaluation")
        return cls(**value)
