"""Math answer reward: extract the final answer and check it against the gold with math-verify."""

import functools
import logging
import math
import os
from typing import Any, Literal

from dgpo.rewards.base import Reward, SampleStatus
from dgpo.rewards.extract import extract_boxed, extract_last_number
from dgpo.rewards.pool import CRASHED, TIMEOUT, ScoringPool

_EXTRACTIONS = ("boxed", "lenient")
_DELIMITERS = ("$", "\\(", "\\[")


def gold_latex(gold: str) -> str:
    r"""Return the gold answer as math-verify should parse it: a bare answer wrapped in ``$...$``.

    Args:
        gold: A gold answer, bare (``\frac{1}{2}``) or already delimited (``$...$``,
            ``\(...\)``, ``\[...\]``, or containing ``\boxed{}``).

    Returns:
        The text to pass to ``math_verify.parse``.

    """
    gold = gold.strip()
    if gold.startswith(_DELIMITERS) or "\\boxed" in gold:
        return gold
    return f"${gold}$"


@functools.lru_cache(maxsize=4096)  # per worker process; n samples per prompt share one gold
def _parse_gold(gold: str) -> list[Any]:
    from math_verify import parse

    return parse(gold_latex(gold), parsing_timeout=None)


def verify_answer(gold: str, answer: str) -> SampleStatus:
    r"""Check one extracted answer against its gold answer with math-verify.

    Math-verify's own ``signal.alarm`` timeouts are switched off: this function does not bound
    its run time, so call it through a :class:`~dgpo.rewards.pool.ScoringPool` (as
    :class:`MathVerifyReward` does) when the answer comes from a model.

    Args:
        gold: The gold answer (see :func:`gold_latex`).
        answer: The extracted answer, e.g. the content of the last ``\boxed{}``.

    Returns:
        ``"correct"`` or ``"wrong"``, or ``"unparsed"`` if math-verify could not parse either side.

    """
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return "unparsed"
    # gold first: verify is not symmetric
    return "correct" if verify(gold_parsed, answer_parsed, timeout_seconds=None) else "wrong"


def _init_worker() -> None:
    """Silence math-verify's per-sample log lines and pay its lazy imports once per worker."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    verify_answer("\\frac{1}{2}", "0.5")


class MathVerifyReward(Reward):
    r"""Rewards a completion whose final answer math-verify finds equal to the gold answer.

    The answer is the content of the last ``\boxed{...}`` (braces balanced); with
    ``extraction="lenient"``, a completion without a boxed answer falls back to its last number.
    Answers are checked in a pool of worker processes started on the first call and reused
    (see :class:`~dgpo.rewards.pool.ScoringPool`): each sample gets ``timeout_s`` seconds, and a
    worker stuck past that is killed and replaced. A sample that times out, cannot be parsed or
    crashes its worker scores ``wrong_reward`` and is counted in :meth:`metrics`; the call never
    fails because of one sample.

    The reward of a sample is ``correct_reward`` or ``wrong_reward``, plus ``format_reward`` if
    its answer was boxed and could be checked (status ``correct`` or ``wrong``).
    ``metrics()["accuracy"]`` counts correctness alone, without the format bonus.

    The pool is not part of the object's state: a pickled or deep-copied reward starts its own
    workers when first called. :meth:`close` stops the workers; they are also stopped when the
    reward is garbage collected and at interpreter exit. Workers are fresh interpreters (not
    forks), so the reward is safe to call next to CUDA and vLLM, from scripts without a
    ``__main__`` guard and from notebooks.

    Args:
        timeout_s: Seconds allowed per sample.
        num_workers: Number of worker processes.
        extraction: ``"boxed"`` reads only the last ``\boxed{}``; ``"lenient"`` falls back to
            the last number in the completion when there is no boxed answer.
        correct_reward: Reward of a correct answer.
        wrong_reward: Reward of a wrong, missing, unparsable, timed-out or crashed answer.
        format_reward: Bonus for a checked answer given in ``\boxed{}`` (reward shaping).

    Raises:
        ValueError: If ``timeout_s <= 0``, ``num_workers < 1``, ``extraction`` is not one of
            ``"boxed"``/``"lenient"``, or a reward value is not a finite number.

    Example:
        >>> reward = MathVerifyReward(timeout_s=5.0, num_workers=1)
        >>> reward([r"So the answer is $\boxed{\frac{1}{2}}$.", "I think 0.5"], ["0.5", "0.5"])
        [1.0, 0.0]
        >>> reward.metrics()["accuracy"], reward.details()[1]["status"]
        (0.5, 'unparsed')
        >>> reward.close()

    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        extraction: Literal["boxed", "lenient"] = "boxed",
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        format_reward: float = 0.0,
    ) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        if extraction not in _EXTRACTIONS:
            raise ValueError(f"extraction must be one of {_EXTRACTIONS}, got {extraction!r}")
        for name, value in [
            ("correct_reward", correct_reward),
            ("wrong_reward", wrong_reward),
            ("format_reward", format_reward),
        ]:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.extraction = extraction
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)
        self.format_reward = float(format_reward)
        self._pool: ScoringPool | None = None
        self._pool_pid = 0
        self._details: list[dict[str, Any]] = []
        self._restarts = 0
        self._called = False

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """Score a batch (see :class:`~dgpo.rewards.base.RewardFunction`); ignore ``columns``."""
        extracted = [self._extract(completion) for completion in completions]
        statuses = self._verify([str(gold) for gold in answers], [a for a, _ in extracted])
        self._called = True
        rewards = []
        self._details = []
        for (answer, boxed), status in zip(extracted, statuses, strict=True):
            reward = self.correct_reward if status == "correct" else self.wrong_reward
            if boxed and status in ("correct", "wrong"):
                reward += self.format_reward
            rewards.append(reward)
            self._details.append(
                {"parsed_answer": answer, "status": status, "boxed": boxed, "reward": reward}
            )
        return rewards

    def metrics(self) -> dict[str, float]:
        """Return counts and fractions from the last call.

        Returns:
            ``accuracy`` (fraction correct, without the format bonus), ``boxed_fraction``
            (fraction with a boxed answer), ``parse_failures`` (no answer found, or math-verify
            could not parse it), ``timeouts``, ``worker_crashes`` (samples whose worker died or
            raised), ``worker_restarts`` (workers killed or replaced) and ``samples``. Empty
            before the first call.

        """
        if not self._called:
            return {}
        statuses = [d["status"] for d in self._details]
        count = max(len(statuses), 1)
        return {
            "samples": float(len(statuses)),
            "accuracy": statuses.count("correct") / count,
            "boxed_fraction": sum(d["boxed"] for d in self._details) / count,
            "parse_failures": float(statuses.count("unparsed")),
            "timeouts": float(statuses.count(TIMEOUT)),
            "worker_crashes": float(statuses.count(CRASHED)),
            "worker_restarts": float(self._restarts),
        }

    def details(self) -> list[dict[str, Any]]:
        """Return each sample's ``parsed_answer``, ``status``, ``boxed``, ``reward`` (last call)."""
        return [dict(d) for d in self._details]

    def close(self) -> None:
        """Stop the worker processes; the next call starts new ones."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
        self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None  # processes do not travel; the copy starts its own when called
        state.update(_details=[], _restarts=0, _called=False)  # the last call's data stays here
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(timeout_s={self.timeout_s}, num_workers={self.num_workers}, "
            f"extraction={self.extraction!r}, correct_reward={self.correct_reward}, "
            f"wrong_reward={self.wrong_reward}, format_reward={self.format_reward})"
        )

    def _extract(self, completion: str) -> tuple[str | None, bool]:
        """Return ``(answer or None, whether it came from a boxed answer)``."""
        answer = extract_boxed(completion)
        if answer is not None:
            return (answer or None), True
        if self.extraction == "lenient":
            return extract_last_number(completion), False
        return None, False

    def _verify(self, golds: list[str], answers: list[str | None]) -> list[SampleStatus]:
        """Check each distinct ``(gold, answer)`` pair once in the pool; no answer is unparsed."""
        unique: dict[tuple[str, str], int] = {}  # a group of samples often repeats an answer
        for gold, answer in zip(golds, answers, strict=True):
            if answer is not None:
                unique.setdefault((gold, answer), len(unique))
        self._restarts = 0
        results: list[SampleStatus] = []
        if unique:
            pool = self._get_pool()
            restarts_before = pool.restarts
            results = pool.map(list(unique))
            self._restarts = pool.restarts - restarts_before
        return [
            "unparsed" if answer is None else results[unique[gold, answer]]
            for gold, answer in zip(golds, answers, strict=True)
        ]

    def _get_pool(self) -> ScoringPool:
        if self._pool is None or self._pool_pid != os.getpid():  # new, unpickled or forked
            self._pool = ScoringPool(
                self._scorer, self.num_workers, self.timeout_s, initializer=_init_worker
            )
            self._pool_pid = os.getpid()
        return self._pool

    #: The function the workers run, ``(gold, answer) -> status``; a subclass may replace it with
    #: another picklable module-level function (the tests use this to crash a worker on purpose).
    _scorer = staticmethod(verify_answer)
