"""The reward contract: a callable from completions and gold answers to one float per completion."""

from collections.abc import Sized
from typing import Any, Literal, Protocol, runtime_checkable

#: What happened to one sample: its answer matched, did not match, could not be read, took too
#: long, or took the scoring worker down with it.
SampleStatus = Literal["correct", "wrong", "unparsed", "timeout", "crashed"]


@runtime_checkable
class RewardFunction(Protocol):
    """Anything that scores a batch of completions against gold answers.

    The contract is ``(completions: list[str], answers: list[str], **columns: list) ->
    list[float]``. A plain class (or function) with such a ``__call__`` is enough; subclassing
    :class:`Reward` is optional. The training loop also reads ``metrics()`` and ``details()``
    when a reward has them (see :class:`Reward`).

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
            ``N`` floats, one per completion.

        """
        ...


class Reward:
    """Optional base class for rewards: input checks plus the ``metrics``/``details`` defaults.

    Subclasses implement :meth:`score`; :meth:`__call__` checks that every input has one entry
    per completion before and after scoring. ``metrics()`` and ``details()`` describe the last
    call; the defaults here are empty. A reward that holds resources (processes, servers)
    releases them in :meth:`close`; ``with reward: ...`` closes it on exit.

    Example:
        >>> class ExactMatch(Reward):
        ...     def score(self, completions, answers, **columns):
        ...         return [float(c.strip() == a) for c, a in zip(completions, answers)]
        >>> ExactMatch()(["4", "5"], ["4", "4"])
        [1.0, 0.0]

    """

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """Check the batch, score it and check the result (see :class:`RewardFunction`).

        Raises:
            ValueError: If ``answers``, a column or the returned list does not have one entry per
                completion.

        """
        check_batch(completions, answers, columns)
        rewards = self.score(completions, answers, **columns)
        if len(rewards) != len(completions):
            raise ValueError(
                f"{type(self).__name__}.score returned {len(rewards)} rewards for "
                f"{len(completions)} completions; expected one per completion"
            )
        return rewards

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """Score an already checked batch; see :class:`RewardFunction` for the arguments."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def metrics(self) -> dict[str, float]:
        """Return counts and fractions from the last call, e.g. ``{"accuracy": 0.25}``."""
        return {}

    def details(self) -> list[dict[str, Any]]:
        """Return per-sample information from the last call (``parsed_answer``, ``status``...)."""
        return []

    def close(self) -> None:
        """Release resources (worker processes); the reward may be called again afterwards."""

    def __enter__(self) -> "Reward":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_batch(completions: list[str], answers: list[str], columns: dict[str, Any]) -> None:
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
