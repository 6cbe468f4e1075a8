import re
import zlib

import pytest

from dgpo.data import ArithmeticTask, arithmetic_problems
from dgpo.data.synthetic import as_arithmetic_task, is_held_out


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
        ({"split": "test"}, r"split must be one of \['all', 'train', 'held_out'\], got 'test'"),
        ({"held_out_fraction": 1.0}, r"held_out_fraction must be in \[0, 1\), got 1.0"),
        ({"split": "held_out"}, "split='held_out' needs held_out_fraction > 0"),
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


def test_train_and_held_out_splits_are_disjoint_and_cover_the_fraction() -> None:
    """Every expression of 1..9 + 1..9 falls in exactly one split, about 30 % held out."""
    task = {"operations": ("+",), "max_operand": 9, "held_out_fraction": 0.3}
    train = arithmetic_problems(400, seed=0, split="train", **task)
    held_out = arithmetic_problems(400, seed=1, split="held_out", **task)
    train_texts = {p["problem"] for p in train}
    held_out_texts = {p["problem"] for p in held_out}
    assert not train_texts & held_out_texts
    # 400 draws from 81 expressions see (nearly) all of them: the two sets partition the task.
    everything = {f"What is {a} + {b}?" for a in range(1, 10) for b in range(1, 10)}
    assert train_texts | held_out_texts == everything
    expected = {text for text in everything if is_held_out(text, 0.3)}
    assert held_out_texts == expected
    # CRC-32 spreads them: the held-out share is near the fraction (18..30 of 81 at 0.3).
    assert 0.22 <= len(expected) / len(everything) <= 0.37
    assert held_out[0]["id"] == "arithmetic-held-out-1-0"
    for problem in held_out:  # answers are still right
        a, b = (int(x) for x in re.findall(r"\d+", problem["problem"]))
        assert problem["answer"] == str(a + b)


def test_is_held_out_is_a_stable_hash() -> None:
    # CRC-32 of b"What is 1 + 1?" is 0x59dc3423 = 1507603491, whose last four digits are 3491.
    assert zlib.crc32(b"What is 1 + 1?") == 0x59DC3423
    assert is_held_out("What is 1 + 1?", 0.35)
    assert not is_held_out("What is 1 + 1?", 0.349)


def test_split_all_keeps_the_unsplit_problems() -> None:
    assert arithmetic_problems(6, seed=3, held_out_fraction=0.5) == arithmetic_problems(6, seed=3)


def test_a_split_too_small_for_the_request_fails_clearly() -> None:
    with pytest.raises(ValueError, match="could not draw 5 problems of split 'held_out'"):
        arithmetic_problems(5, max_operand=1, split="held_out", held_out_fraction=0.01)


def test_as_arithmetic_task_names_unknown_keys() -> None:
    assert as_arithmetic_task({"num_problems": 2}).num_problems == 2
    with pytest.raises(ValueError, match=r"unknown synthetic task settings \['size'\]"):
        as_arithmetic_task({"size": 2})
