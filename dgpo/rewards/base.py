"""The reward contract: completions and answers in; scores, details and metrics out of one call.

A reward is any callable ``(completions, answers, **columns)`` that returns either a
:class:`RewardOutput` or a plain list of one number per completion. The training loop and the
evaluator call it through :func:`call_reward`, which checks the output right after the call and
bounds the call's time.

This module does not import torch at import time: the math-verify scoring workers import the
``dgpo.rewards`` package and stay small.
"""

import math
import numbers
import threading
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

#: What happened to one sample: its answer matched, did not match, could not be read, took too
#: long, or took the scoring worker down with it.
SampleStatus = Literal["correct", "wrong", "unparsed", "timeout", "crashed"]
#: Seconds :func:`call_reward` allows a reward call by default: far more than a healthy reward of
#: a rollout batch needs, so that only a blocked reward (a verifier that never answers) hits it.
DEFAULT_REWARD_TIMEOUT_S = 600.0
#: How a reward metric combines across ranks (see :func:`dgpo.distributed.reduce_reward_metrics`).
Reduction = Literal["mean", "sum", "max", "min"]
#: The reductions, in the order error messages list them.
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum", "max", "min")
#: The reduction of a metric that does not declare one: the mean weighted by sample counts, which
#: is right for the usual per-sample averages (accuracy, F1, ...); counts must declare ``"sum"``.
DEFAULT_REDUCTION: Reduction = "mean"


@dataclass
class RewardOutput:
    """Everything a reward computed for a batch of ``N`` completions, returned by one call.

    Attributes:
        scores: ``N`` finite numbers, one per completion: the rewards that RL optimises.
        details: Per-sample information (``parsed_answer``, ``status``, ...): ``N`` dicts, or
            none.
        metrics: Numbers about the batch, logged as ``rollout/reward/<name>``.
        reductions: How each metric combines across ranks: ``"mean"`` (weighted by each
            rank's number of samples), ``"sum"`` (counts), ``"max"`` or ``"min"``. A metric left
            out gets :data:`DEFAULT_REDUCTION` (``"mean"``), filled in here, so after
            construction ``reductions`` names every metric.
        correct: Per-sample correctness (``N`` bools), or None when the reward has no notion of
            it (the training loop then logs no ``solve_all``/``solve_none``, only
            ``zero_variance`` from the scores).

    Raises:
        ValueError: If a reduction is not one of ``"mean"``, ``"sum"``, ``"max"``, ``"min"``.

    Example:
        >>> out = RewardOutput([1.0, 0.0], metrics={"accuracy": 0.5, "timeouts": 0.0},
        ...                    reductions={"timeouts": "sum"}, correct=[True, False])
        >>> out.reductions
        {'accuracy': 'mean', 'timeouts': 'sum'}

    """

    scores: list[float]
    details: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    reductions: dict[str, Reduction] = field(default_factory=dict)
    correct: list[bool] | None = None

    def __post_init__(self) -> None:
        for name, how in self.reductions.items():
            if how not in REDUCTIONS:
                raise ValueError(f"reduction {how!r} of metric {name!r} is not one of "
                                 f"{list(REDUCTIONS)}")
        self.reductions = {**dict.fromkeys(self.metrics, DEFAULT_REDUCTION), **self.reductions}


@runtime_checkable
class RewardFunction(Protocol):
    """Anything that scores a batch of completions against gold answers.

    The contract is ``(completions: list[str], answers: list[str], **columns: list) ->
    RewardOutput | list[float]``. A plain function or class returning one number per completion
    is enough; return a :class:`RewardOutput` to also report per-sample details, metrics (with
    their cross-rank reductions) and correctness. Subclassing :class:`Reward` is optional.

    The protocol's annotations are ``Any`` on purpose: jsonargparse (LightningCLI) accepts a
    ``class_path`` for a protocol-typed argument only if the class's ``__call__`` matches the
    protocol's signature, with types compared exactly. With ``Any`` here, a user's class whose
    ``__call__`` takes ``completions``, ``answers`` and ``**columns`` is accepted whatever its
    annotations (or none).

    Example:
        >>> class LengthPenalty:
        ...     def __call__(self, completions, answers, **columns):
        ...         return [-len(c) / 1000 for c in completions]
        >>> isinstance(LengthPenalty(), RewardFunction)
        True

    """

    def __call__(self, completions: Any, answers: Any, **columns: Any) -> Any:
        """Score a batch.

        Args:
            completions: ``N`` model completions (response text only).
            answers: ``N`` gold answers, aligned with ``completions``.
            **columns: Extra per-sample data columns (lists of length ``N``), such as
                ``problem`` or ``source``; a reward ignores those it does not need.

        Returns:
            A :class:`RewardOutput`, or ``N`` finite numbers, one per completion.

        """
        ...


class Reward:
    """Optional base class for rewards: input and output checks, start-up and clean-up hooks.

    Subclasses implement :meth:`score`, returning a :class:`RewardOutput` or a list of floats;
    :meth:`__call__` checks that every input has one entry per completion and returns the
    checked :class:`RewardOutput`. A reward that needs resources (processes, servers) acquires
    and checks them in :meth:`start` (called before the first rollout) or lazily, and releases
    them in :meth:`close`; ``with reward: ...`` closes it on exit.

    Example:
        >>> class ExactMatch(Reward):
        ...     def score(self, completions, answers, **columns):
        ...         return [float(c.strip() == a) for c, a in zip(completions, answers)]
        >>> ExactMatch()(["4", "5"], ["4", "4"]).scores
        [1.0, 0.0]

    """

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> RewardOutput:
        """Check the batch, score it and check the result (see :class:`RewardFunction`).

        Raises:
            ValueError: If ``answers`` or a column does not have one entry per completion, or
                :meth:`score`'s output breaks the contract (see :func:`call_reward`).

        """
        check_batch(completions, answers, columns)
        return check_output(self, self.score(completions, answers, **columns), completions)

    def score(self, completions: list[str], answers: list[str],
              **columns: Any) -> RewardOutput | list[float]:
        """Score an already checked batch; see :class:`RewardFunction` for the arguments."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def start(self) -> None:
        """Acquire resources and check that the reward works (the default does nothing)."""

    def close(self) -> None:
        """Release resources (worker processes); the reward may be called again afterwards."""

    def __enter__(self) -> "Reward":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def reward_name(reward: object) -> str:
    """The name of a reward in messages: a function's name, else its class's name."""
    return getattr(reward, "__name__", None) or type(reward).__name__


def start_reward(reward: RewardFunction) -> None:
    """Call ``reward.start()`` if it has one: start its resources and check it works."""
    start = getattr(reward, "start", None)
    if callable(start):
        start()


def close_reward(reward: RewardFunction) -> None:
    """Call ``reward.close()`` if it has one: release its resources."""
    close = getattr(reward, "close", None)
    if callable(close):
        close()


def call_reward(reward: RewardFunction, completions: list[str], answers: list[str],
                columns: Mapping[str, Any] | None = None,
                timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S) -> RewardOutput:
    """Call a reward once, under a timeout, and check what it returned.

    The reward runs in a helper (daemon) thread that inherits the caller's CUDA device and
    grad mode, while the caller waits at most ``timeout_s`` seconds. Python cannot stop a
    thread: a reward that times out is abandoned, still running, and the error stops the run;
    do not call that reward object again (it may still be busy), and expect its thread to end
    with the process. A reward that needs the main thread (e.g. one using ``signal.alarm``,
    as math-verify's own timeouts do) must run with ``timeout_s=None``, which calls it in the
    calling thread without a time limit.

    Args:
        reward: A :class:`RewardFunction`: returns a :class:`RewardOutput` or ``N`` numbers.
        completions: ``N`` completions.
        answers: ``N`` gold answers.
        columns: Extra per-sample columns passed as keyword arguments.
        timeout_s: Seconds the call may take; None: no limit, and no helper thread.

    Returns:
        The checked output: ``N`` float scores, ``N`` details or none, float metrics, and a
        reduction for every metric.

    Raises:
        ValueError: If ``answers`` or a column does not have ``N`` entries; if the reward
            returns something other than a :class:`RewardOutput` or a sequence of numbers, the
            wrong number of scores, a score that is not a number (``None``, a string) or is not
            finite (the message names the reward, the sample and the value; ``True``/``False``
            count as 1 and 0), details or correctness of the wrong length, or a non-numeric
            metric; or if ``timeout_s`` is not a positive number or None.
        RuntimeError: If the reward does not return within ``timeout_s`` seconds.

    Example:
        >>> call_reward(lambda completions, answers: [1] * len(completions), ["a"], ["b"])
        RewardOutput(scores=[1.0], details=[], metrics={}, reductions={}, correct=None)

    """
    columns = dict(columns or {})
    if timeout_s is not None and (isinstance(timeout_s, bool) or
                                  not isinstance(timeout_s, (int, float)) or
                                  not (timeout_s > 0 and math.isfinite(timeout_s))):
        raise ValueError(f"timeout_s must be a number of seconds > 0 or None, got {timeout_s!r}")
    check_batch(completions, answers, columns)
    if timeout_s is None:
        raw = reward(completions, answers, **columns)
    else:
        raw = _call_with_timeout(lambda: reward(completions, answers, **columns), timeout_s,
                                 reward_name(reward), len(completions))
    return check_output(reward, raw, completions)


def _call_with_timeout(fn: Any, timeout_s: float, name: str, size: int) -> Any:
    """Run ``fn()`` in a daemon thread; its result, its exception, or a RuntimeError."""
    import torch  # here, not at the top: the scoring workers import this module and stay light

    outcome: dict[str, Any] = {}
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    grad_enabled = torch.is_grad_enabled()

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = fn()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RuntimeError(
            f"reward {name} did not return within timeout_s={timeout_s:g} s (a batch of {size} "
            "completions); it is left running in a background thread. Raise the reward timeout "
            "if the reward is just slow, or fix what it waits for (a verifier server?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def check_output(reward: object, raw: Any, completions: list[str]) -> RewardOutput:
    """Check a reward's return value and normalise it (see :func:`call_reward`).

    Args:
        reward: The reward (for its name in messages).
        raw: What it returned: a :class:`RewardOutput`, or a sequence (list, tuple, 1-D tensor
            or array) of ``N`` numbers.
        completions: The ``N`` completions it scored.

    Returns:
        A new :class:`RewardOutput` with plain ``float`` scores and metrics.

    Raises:
        ValueError: Naming the reward and the offending sample, value or field.

    """
    name, size = reward_name(reward), len(completions)
    output = raw if isinstance(raw, RewardOutput) else RewardOutput(scores=raw)
    scores = output.scores
    if not isinstance(scores, (list, tuple)) and hasattr(scores, "tolist"):  # tensor, array
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"{name} returned {_short(raw)}: a reward returns a RewardOutput or a "
                         f"list of {size} numbers, one per completion")
    if len(scores) != size:
        raise ValueError(f"{name} returned {len(scores)} scores for {size} completions; a reward "
                         "returns one score per completion")
    checked = []
    for index, value in enumerate(scores):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(
                f"{name} returned {_short(value)} for sample {index}: every score must be a "
                f"finite number (int or float) (completion {_short(completions[index])})")
        checked.append(float(value))
    details = list(output.details)
    if len(details) not in (0, size) or not all(isinstance(d, dict) for d in details):
        raise ValueError(f"{name} returned {len(details)} details for {size} completions; "
                         "give one dict per completion, or none")
    correct = None if output.correct is None else list(output.correct)
    if correct is not None and (len(correct) != size or
                                not all(c in (True, False) for c in correct)):
        raise ValueError(f"{name} returned correct={_short(output.correct)} for {size} "
                         "completions; give one bool per completion, or None")
    for key, value in output.metrics.items():
        if not isinstance(key, str) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} returned metric {key!r} = {_short(value)}; metrics map "
                             "names (str) to numbers")
    return RewardOutput(scores=checked, details=details,
                        metrics={k: float(v) for k, v in output.metrics.items()},
                        reductions=dict(output.reductions),
                        correct=None if correct is None else [bool(c) for c in correct])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def check_batch(completions: list[str], answers: list[str], columns: Mapping[str, Any]) -> None:
    """Raise unless ``answers`` and every column have one entry per completion.

    Args:
        completions: The completions of a batch.
        answers: The gold answers of the batch.
        columns: The extra per-sample columns, by name.

    Raises:
        ValueError: Naming the first input whose length differs from ``len(completions)``
            (columns that are not sequences, e.g. a step number, are not checked).

    """
    expected = len(completions)
    for name, values in {"answers": answers, **columns}.items():
        if isinstance(values, Sized) and not isinstance(values, str) and len(values) != expected:
            raise ValueError(
                f"{name} has {len(values)} entries but there are {expected} completions; "
                "every input needs one entry per completion"
            )
