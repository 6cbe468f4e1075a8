"""Synthetic arithmetic problems with exact answers, for the CPU quickstart and for tests."""

import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from dgpo.settings import check_known_keys

Operation = Literal["+", "-", "*"]
Split = Literal["all", "train", "held_out"]


def is_held_out(problem: str, held_out_fraction: float) -> bool:
    """Whether ``problem`` belongs to the held-out part of its task.

    A stable hash (CRC-32) of the problem text puts a fixed ``held_out_fraction`` of all possible
    problems aside, so the train and held-out splits never share a problem, in any process and
    for any seed.
    """
    return zlib.crc32(problem.encode()) % 10_000 < round(held_out_fraction * 10_000)


def _evaluate(operands: list[int], operations: list[str]) -> int:
    """Evaluate ``operands[0] op[0] operands[1] ...`` with ``*`` binding tighter than ``+``/``-``.

    Args:
        operands: The numbers, one more than ``operations``.
        operations: The operators between them.

    Returns:
        The value of the expression.

    """
    total, term = 0, operands[0]
    sign = 1
    for operation, operand in zip(operations, operands[1:], strict=True):
        if operation == "*":
            term *= operand
        else:
            total += sign * term
            sign, term = (1 if operation == "+" else -1), operand
    return total + sign * term


def _validate(
    num_problems: int,
    operations: Sequence[str],
    max_operand: int,
    num_operands: int,
    split: str = "all",
    held_out_fraction: float = 0.0,
) -> None:
    """Check the arguments of :func:`arithmetic_problems`.

    Raises:
        ValueError: Naming the bad value and the valid ones.

    """
    valid = get_args(Operation)
    if isinstance(num_problems, bool) or not isinstance(num_problems, int) or num_problems < 1:
        raise ValueError(f"num_problems must be an int >= 1, got {num_problems!r}")
    if isinstance(operations, str) or not operations:
        raise ValueError(
            f"operations must be a non-empty list of operators from {list(valid)}, "
            f"got {operations!r}"
        )
    for operation in operations:
        if operation not in valid:
            raise ValueError(f"unknown operation {operation!r}; valid operations: {list(valid)}")
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")
    if isinstance(num_operands, bool) or not isinstance(num_operands, int) or num_operands < 2:
        raise ValueError(f"num_operands must be an int >= 2, got {num_operands!r}")
    if split not in get_args(Split):
        raise ValueError(f"split must be one of {list(get_args(Split))}, got {split!r}")
    if isinstance(held_out_fraction, bool) or not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction!r}")
    if split == "held_out" and held_out_fraction == 0.0:
        raise ValueError("split='held_out' needs held_out_fraction > 0, got 0.0")


def arithmetic_problems(
    num_problems: int,
    seed: int = 0,
    operations: Sequence[Operation] = ("+",),
    max_operand: int = 50,
    num_operands: int = 2,
    split: Split = "all",
    held_out_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Generate deterministic "What is 23 + 19?" problems with their exact integer answers.

    Operands are drawn uniformly from ``1..max_operand`` and operators uniformly from
    ``operations``; ``*`` binds tighter than ``+`` and ``-`` (usual precedence), and answers may
    be negative when ``-`` is used. The same arguments always give the same problems.

    Args:
        num_problems: How many problems to generate (duplicates are possible).
        seed: Seed of the generator.
        operations: Operators to draw from: ``"+"``, ``"-"``, ``"*"``.
        max_operand: Largest operand.
        num_operands: Numbers per expression (``>= 2``).
        split: ``"all"`` draws from every expression; ``"train"`` skips the held-out ones and
            ``"held_out"`` keeps only those (see :func:`is_held_out`), so the two never overlap.
        held_out_fraction: Share of all expressions set aside for ``"held_out"``.

    Returns:
        Dicts with ``"id"`` (``"arithmetic-<seed>-<i>"``), ``"problem"`` and ``"answer"`` (the
        integer answer as a string).

    Raises:
        ValueError: On an unknown operation or an out-of-range argument.

    Example:
        >>> arithmetic_problems(2, seed=0, max_operand=9)[1]
        {'id': 'arithmetic-0-1', 'problem': 'What is 5 + 9?', 'answer': '14'}

    """
    _validate(num_problems, operations, max_operand, num_operands, split, held_out_fraction)
    rng = random.Random(seed)
    prefix = "arithmetic-held-out" if split == "held_out" else "arithmetic"
    problems: list[dict[str, Any]] = []
    for _ in range(1000 * num_problems):  # rejection sampling; bounded so bad settings fail
        operands = [rng.randint(1, max_operand) for _ in range(num_operands)]
        ops = [rng.choice(list(operations)) for _ in range(num_operands - 1)]
        expression = " ".join(
            [str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:], strict=True)]
        )
        problem = f"What is {expression}?"
        if split != "all" and is_held_out(problem, held_out_fraction) != (split == "held_out"):
            continue
        problems.append({
            "id": f"{prefix}-{seed}-{len(problems)}",
            "problem": problem,
            "answer": str(_evaluate(operands, ops)),
        })
        if len(problems) == num_problems:
            return problems
    raise ValueError(f"could not draw {num_problems} problems of split {split!r} with "
                     f"held_out_fraction={held_out_fraction} from this task: too few expressions")


@dataclass
class ArithmeticTask:
    """Settings of the synthetic arithmetic task (the ``synthetic`` argument of the datamodule).

    Example:
        >>> ArithmeticTask(num_problems=3, operations=("+", "*")).problems()[0]["problem"]
        'What is 25 * 49?'

    """

    num_problems: int = 256
    """How many problems to generate."""
    seed: int = 0
    """Seed of the generator (independent of the prompt-order seed)."""
    operations: tuple[Operation, ...] = ("+",)
    """Operators to draw from: ``"+"``, ``"-"``, ``"*"``."""
    max_operand: int = 50
    """Largest operand (operands are drawn from ``1..max_operand``)."""
    num_operands: int = 2
    """Numbers per expression (``>= 2``)."""
    split: Split = "all"
    """``"train"`` or ``"held_out"`` for disjoint splits of the task; ``"all"``: no split."""
    held_out_fraction: float = 0.0
    """Share of all expressions reserved for the ``"held_out"`` split (by a hash of the text)."""

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            ValueError: On an unknown operation or an out-of-range value.

        """
        _validate(self.num_problems, self.operations, self.max_operand, self.num_operands,
                  self.split, self.held_out_fraction)
        self.operations = tuple(self.operations)

    def problems(self) -> list[dict[str, Any]]:
        """Generate the problems (see :func:`arithmetic_problems`)."""
        return arithmetic_problems(
            self.num_problems, self.seed, self.operations, self.max_operand, self.num_operands,
            self.split, self.held_out_fraction,
        )


def as_arithmetic_task(settings: ArithmeticTask | Mapping[str, Any]) -> ArithmeticTask:
    """Return ``settings`` as an :class:`ArithmeticTask` (a dict of its fields is accepted).

    Raises:
        ValueError: On an unknown key or a bad value.

    """
    if isinstance(settings, ArithmeticTask):
        return settings
    check_known_keys(ArithmeticTask, settings, "synthetic task")
    return ArithmeticTask(**settings)
