"""Math answer reward: extract the final answer and check it against the gold with math-verify."""

import functools
import logging
import math
import os
from typing import Any, Literal

from dgpo.rewards.base import Reward, RewardOutput, SampleStatus
from dgpo.rewards.extract import extract_boxed, extract_last_number
from dgpo.rewards.pool import CRASHED, TIMEOUT, ScoringPool

_EXTRACTIONS = ("boxed", "lenient")
_ON_FAILURES = ("warn", "error")
_DELIMITERS = ("$", "\\(", "\\[")
#: The start-up self-test: math-verify must find this answer equal to this gold answer.
SELF_TEST = ("\\frac{1}{2}", "0.5")
#: How each metric of :class:`MathVerifyReward` combines across ranks (the others: the mean).
_SUMMED = ("samples", "parse_failures", "timeouts", "worker_crashes", "worker_restarts")

logger = logging.getLogger(__name__)


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


def verify_answer(gold: str, answer: str, raise_on_error: bool = False) -> SampleStatus:
    r"""Check one extracted answer against its gold answer with math-verify.

    Math-verify's own ``signal.alarm`` timeouts are switched off: this function does not bound
    its run time, so call it through a :class:`~dgpo.rewards.pool.ScoringPool` (as
    :class:`MathVerifyReward` does) when the answer comes from a model.

    Args:
        gold: The gold answer (see :func:`gold_latex`).
        answer: The extracted answer, e.g. the content of the last ``\boxed{}``.
        raise_on_error: Raise math-verify's (or SymPy's) exceptions instead of counting them as
            ``"unparsed"``/``"wrong"`` as math-verify does by default (its error log lines are
            at DEBUG level, so a broken installation would otherwise look like a wrong model).

    Returns:
        ``"correct"`` or ``"wrong"``, or ``"unparsed"`` if math-verify could not parse either side.

    """
    from math_verify import parse, verify

    if raise_on_error:
        gold_parsed = parse(gold_latex(gold), parsing_timeout=None, raise_on_error=True)
    else:
        gold_parsed = _parse_gold(gold)
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None,
                          raise_on_error=raise_on_error)
    if not gold_parsed or not answer_parsed:
        return "unparsed"
    # gold first: verify is not symmetric
    correct = verify(gold_parsed, answer_parsed, timeout_seconds=None,
                     raise_on_error=raise_on_error)
    return "correct" if correct else "wrong"


class _DropDisabledTimeoutWarning(logging.Filter):
    """Drops math-verify's "Timeout is disabled" warning: the scoring pool bounds each sample."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _init_worker() -> None:
    """Check that math-verify works (the self-test), paying its lazy imports once per worker.

    Math-verify's loggers keep their levels: its per-sample errors are DEBUG lines (hidden), and
    its warnings (a deprecated option, a timeout) are worth seeing. Only the one warning that is
    known to be harmless here is dropped: "Timeout is disabled", because the pool, not
    math-verify's ``signal.alarm``, bounds each sample's time.

    Raises:
        RuntimeError: If ``verify_answer`` does not find :data:`SELF_TEST`'s answer correct;
            math-verify's own exceptions propagate (the pool reports them with the traceback).

    """
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    gold, answer = SELF_TEST
    status = verify_answer(gold, answer, raise_on_error=True)
    if status != "correct":
        raise RuntimeError(f"math-verify self-test failed: verify_answer({gold!r}, {answer!r}) "
                           f"returned {status!r}, expected 'correct'; the scorer is broken (check "
                           "the math-verify and latex2sympy2_extended installation)")


class MathVerifyReward(Reward):
    r"""Rewards a completion whose final answer math-verify finds equal to the gold answer.

    The answer is the content of the last ``\boxed{...}`` (braces balanced); with
    ``extraction="lenient"``, a completion without a boxed answer falls back to its last number.
    Answers are checked in a pool of worker processes (see
    :class:`~dgpo.rewards.pool.ScoringPool`), started by :meth:`start` or on the first call and
    reused: each sample gets ``timeout_s`` seconds, and a worker stuck past that is killed and
    replaced. A sample that times out, cannot be parsed or crashes its worker scores
    ``wrong_reward`` and is counted in the metrics; one sample never fails the call. Each worker
    first runs a self-test (``verify_answer("\frac{1}{2}", "0.5")`` must be ``"correct"``): a
    broken scorer raises ``RuntimeError`` with the traceback instead of scoring every sample 0.
    The first failure of each kind (exception type, timeout, dead worker) is logged with its
    traceback; when more than ``max_failure_fraction`` of a call's samples crash or time out,
    the call logs a warning (``on_failures="warn"``) or raises (``"error"``).

    The reward of a sample is ``correct_reward`` or ``wrong_reward``, plus ``format_reward`` if
    its answer was boxed and could be checked (status ``correct`` or ``wrong``). A call returns a
    :class:`~dgpo.rewards.RewardOutput` whose ``correct`` is the status ``"correct"``, whose
    details give each sample's ``parsed_answer``, ``status``, ``boxed`` and ``reward``, and whose
    metrics are ``accuracy`` (correctness alone, without the format bonus) and
    ``boxed_fraction`` (means), and the counts ``samples``, ``parse_failures`` (no answer found,
    or math-verify could not parse it), ``timeouts``, ``worker_crashes`` (samples whose worker
    died or raised) and ``worker_restarts`` (workers killed or replaced), summed across ranks.

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
        max_failure_fraction: Largest share of a call's samples that may crash or time out
            before ``on_failures`` applies, in [0, 1].
        on_failures: ``"warn"`` (log a warning and go on) or ``"error"`` (raise
            ``RuntimeError`` with the first traceback of each kind of failure).

    Raises:
        ValueError: If ``timeout_s <= 0``, ``num_workers < 1``, ``extraction`` is not one of
            ``"boxed"``/``"lenient"``, a reward value is not a finite number,
            ``max_failure_fraction`` is not in [0, 1] or ``on_failures`` is not ``"warn"`` or
            ``"error"``.

    Example:
        >>> reward = MathVerifyReward(timeout_s=5.0, num_workers=1)
        >>> out = reward([r"The answer is $\boxed{\frac{1}{2}}$.", "I think 0.5"], ["0.5", "0.5"])
        >>> out.scores, out.correct, out.metrics["accuracy"], out.details[1]["status"]
        ([1.0, 0.0], [True, False], 0.5, 'unparsed')
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
        max_failure_fraction: float = 0.1,
        on_failures: Literal["warn", "error"] = "warn",
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
        if (isinstance(max_failure_fraction, bool) or
                not isinstance(max_failure_fraction, (int, float)) or
                not 0.0 <= max_failure_fraction <= 1.0):
            raise ValueError(f"max_failure_fraction must be a number in [0, 1], got "
                             f"{max_failure_fraction!r}")
        if on_failures not in _ON_FAILURES:
            raise ValueError(f"on_failures must be one of {_ON_FAILURES}, got {on_failures!r}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.extraction = extraction
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)
        self.format_reward = float(format_reward)
        self.max_failure_fraction = float(max_failure_fraction)
        self.on_failures = on_failures
        self._pool: ScoringPool | None = None
        self._pool_pid = 0

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> RewardOutput:
        """Score a batch (see :class:`~dgpo.rewards.base.RewardFunction`); ignore ``columns``.

        Raises:
            RuntimeError: If the workers' self-test fails, or (``on_failures="error"``) more
                than ``max_failure_fraction`` of the samples crash or time out.

        """
        extracted = [self._extract(completion) for completion in completions]
        statuses, restarts = self._verify([str(gold) for gold in answers],
                                          [a for a, _ in extracted])
        rewards, details = [], []
        for (answer, boxed), status in zip(extracted, statuses, strict=True):
            reward = self.correct_reward if status == "correct" else self.wrong_reward
            if boxed and status in ("correct", "wrong"):
                reward += self.format_reward
            rewards.append(reward)
            details.append(
                {"parsed_answer": answer, "status": status, "boxed": boxed, "reward": reward}
            )
        count = max(len(statuses), 1)
        metrics = {
            "samples": float(len(statuses)),
            "accuracy": statuses.count("correct") / count,
            "boxed_fraction": sum(boxed for _, boxed in extracted) / count,
            "parse_failures": float(statuses.count("unparsed")),
            "timeouts": float(statuses.count(TIMEOUT)),
            "worker_crashes": float(statuses.count(CRASHED)),
            "worker_restarts": float(restarts),
        }
        self._check_failures(metrics["timeouts"] + metrics["worker_crashes"], len(statuses))
        return RewardOutput(rewards, details, metrics, dict.fromkeys(_SUMMED, "sum"),
                            correct=[status == "correct" for status in statuses])

    def start(self) -> None:
        """Start the workers and run their self-test now, before the first batch.

        Raises:
            RuntimeError: With the traceback, if the self-test fails (a broken scorer).

        """
        self._get_pool().start()

    def close(self) -> None:
        """Stop the worker processes; the next call starts new ones."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
        self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None  # processes do not travel; the copy starts its own when called
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(timeout_s={self.timeout_s}, num_workers={self.num_workers}, "
            f"extraction={self.extraction!r}, correct_reward={self.correct_reward}, "
            f"wrong_reward={self.wrong_reward}, format_reward={self.format_reward}, "
            f"max_failure_fraction={self.max_failure_fraction}, "
            f"on_failures={self.on_failures!r})"
        )

    def _extract(self, completion: str) -> tuple[str | None, bool]:
        """Return ``(answer or None, whether it came from a boxed answer)``."""
        answer = extract_boxed(completion)
        if answer is not None:
            return (answer or None), True
        if self.extraction == "lenient":
            return extract_last_number(completion), False
        return None, False

    def _verify(self, golds: list[str],
                answers: list[str | None]) -> tuple[list[SampleStatus], int]:
        """Check each distinct ``(gold, answer)`` pair once in the pool; no answer is unparsed.

        Returns:
            Each sample's status, and the number of workers restarted meanwhile.

        """
        unique: dict[tuple[str, str], int] = {}  # a group of samples often repeats an answer
        for gold, answer in zip(golds, answers, strict=True):
            if answer is not None:
                unique.setdefault((gold, answer), len(unique))
        restarts = 0
        results: list[SampleStatus] = []
        if unique:
            pool = self._get_pool()
            restarts_before = pool.restarts
            results = pool.map(list(unique))
            restarts = pool.restarts - restarts_before
        statuses: list[SampleStatus] = [
            "unparsed" if answer is None else results[unique[gold, answer]]
            for gold, answer in zip(golds, answers, strict=True)
        ]
        return statuses, restarts

    def _check_failures(self, failures: float, samples: int) -> None:
        """Warn or raise when too many samples crashed or timed out (see ``on_failures``)."""
        if not samples or failures / samples <= self.max_failure_fraction:
            return
        pool_failures = self._pool.failures if self._pool is not None else {}
        message = (f"{type(self).__name__}: {failures:g} of {samples} samples "
                   f"({failures / samples:.0%}) crashed or timed out, more than "
                   f"max_failure_fraction={self.max_failure_fraction:g}; they score "
                   f"wrong_reward={self.wrong_reward:g}")
        if self.on_failures == "error":
            tracebacks = "\n".join(f"--- first {kind}:\n{text}"
                                   for kind, text in pool_failures.items())
            raise RuntimeError(f"{message}\n{tracebacks}")
        logger.warning("%s. Kinds of failure so far (each logged once with its traceback): %s",
                       message, sorted(pool_failures))

    def _get_pool(self) -> ScoringPool:
        if self._pool is None or self._pool_pid != os.getpid():  # new, unpickled or forked
            self._pool = ScoringPool(
                self._scorer, self.num_workers, self.timeout_s, initializer=self._initializer
            )
            self._pool_pid = os.getpid()
        return self._pool

    #: The function the workers run, ``(gold, answer) -> status``; a subclass may replace it with
    #: another picklable module-level function (the tests use this to crash a worker on purpose).
    _scorer = staticmethod(verify_answer)
    #: What each worker runs first: the self-test (a subclass may replace it, like ``_scorer``).
    _initializer = staticmethod(_init_worker)
