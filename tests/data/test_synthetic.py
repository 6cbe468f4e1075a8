import re

import pytest

from dgpo.data import ArithmeticTask, arithmetic_problems


def test_arithmetic_problems_deterministic() -> None:
    assert arithmetic_problems(20, seed=3) == arithmetic_problems(20, seed=3)
    assert arithmetic_problems(20, seed=3) != arithmetic_problems(20, seed=4)
    # a longer list extends a shorter one with the same seed
    assert arithmetic_problems(30, seed=3)[:20] == arithmetic_problems(20, seed=3)


def test_arithmetic_problems_answers_correct() -> None:
    problems = arithmetic_problems(
        200, seed=1, operations=("+", "-", "*"), max_operand=12, num_operands=4
    )
    for problem in problems:
        match = re.fullmatch(r"What is ([0-9+\-* ]+)\?", problem["problem"])
        assert match is not None, problem
        # Python's own precedence is the independent reference here.
        assert problem["answer"] == str(eval(match.group(1)))  # noqa: S307  # our own digits and operators
        operands = [int(x) for x in re.findall(r"\d+", match.group(1))]
        assert len(operands) == 4 and all(1 <= x <= 12 for x in operands)
    assert any(int(p["answer"]) < 0 for p in problems)  # "-" can give negative answers


def test_arithmetic_problems_format() -> None:
    problems = arithmetic_problems(3, seed=5)
    assert [p["id"] for p in problems] == ["arithmetic-5-0", "arithmetic-5-1", "arithmetic-5-2"]
    assert all(re.fullmatch(r"What is \d+ \+ \d+\?", p["problem"]) for p in problems)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_problems": 0}, "num_problems must be an int >= 1, got 0"),
        ({"operations": ("/",)}, r"unknown operation '/'; valid operations: \['\+', '-', '\*'\]"),
        ({"operations": ()}, "operations must be a non-empty list"),
        ({"operations": "+-"}, "operations must be a non-empty list"),
        ({"max_operand": 0}, "max_operand must be an int >= 1, got 0"),
        ({"num_operands": 1}, "num_operands must be an int >= 2, got 1"),
    ],
)
def test_arithmetic_problems_bad_args(kwargs: dict, match: str) -> None:
    args = {"num_problems": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        arithmetic_problems(**args)
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**args)


def test_arithmetic_task_problems_match_function() -> None:
    task = ArithmeticTask(num_problems=5, seed=2, operations=["+", "*"], max_operand=9)
    assert task.operations == ("+", "*")
    assert task.problems() == arithmetic_problems(5, 2, ("+", "*"), 9, 2)
