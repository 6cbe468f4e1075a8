import pytest

from dgpo.rewards import extract_boxed, extract_last_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is $\\boxed{42}$.", "42"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} and more text", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{[0, 1\\}}", "[0, 1\\}"),  # an escaped brace does not close the box
        ("\\fbox{7}", "7"),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed_reads_last_balanced_box(text: str, expected: str) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text", ["no box here", "truncated \\boxed{\\frac{1}{2}", "\\boxed", "\\boxedx{1}", ""]
)
def test_extract_boxed_none_without_closed_box(text: str) -> None:
    assert extract_boxed(text) is None


def test_extract_boxed_last_box_even_if_unclosed() -> None:
    # the final answer was cut off: an earlier box is not taken in its place
    assert extract_boxed("\\boxed{1} ... \\boxed{2") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 apples and 1,250 pears.", "1250"),
        ("It is -3.5.", "-3.5"),
        ("The list 1,2,3", "3"),
        ("pay $18.90 today", "18.90"),
        ("x = .5", ".5"),
        ("no digits", None),
    ],
)
def test_extract_last_number_finds_last(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected
