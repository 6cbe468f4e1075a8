from typing import Any

import pytest

from dgpo.rewards import Reward, RewardOutput, WeightedSumReward


class Constant(Reward):
    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, completions: list[str], answers: list[str], **columns: Any) -> RewardOutput:
        n = len(completions)
        return RewardOutput([self.value] * n, [{"parsed_answer": "x", "status": "wrong"}] * n,
                            {"value": self.value, "calls": 1.0}, {"calls": "sum"},
                            correct=[self.value > 0] * n)


class Length:
    """A plain callable reward: no base class, no metrics."""

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        return [float(len(c)) for c in completions]


def test_weighted_sum_by_hand() -> None:
    combined = WeightedSumReward([Constant(1.0), Length(), Constant(-2.0)], [0.5, 0.1, 0.25])
    output = combined(["ab", "abcd"], ["1", "2"])
    assert output.scores == pytest.approx([0.5 + 0.2 - 0.5, 0.5 + 0.4 - 0.5])
    assert output.metrics == {
        "Constant_0/value": 1.0,
        "Constant_0/calls": 1.0,
        "Constant_0/reward_mean": 1.0,
        "Length/reward_mean": 3.0,
        "Constant_2/value": -2.0,
        "Constant_2/calls": 1.0,
        "Constant_2/reward_mean": -2.0,
    }
    # the sub-rewards' declared reductions travel with the prefix; undeclared ones are means
    assert output.reductions == {
        "Constant_0/value": "mean",
        "Constant_0/calls": "sum",
        "Constant_0/reward_mean": "mean",
        "Length/reward_mean": "mean",
        "Constant_2/value": "mean",
        "Constant_2/calls": "sum",
        "Constant_2/reward_mean": "mean",
    }
    assert output.correct == [True, True]  # the first sub-reward that reports correctness


def test_weighted_sum_without_correctness_reports_none() -> None:
    assert WeightedSumReward([Length()])(["ab"], ["1"]).correct is None


def test_weighted_sum_default_weights_are_one() -> None:
    assert WeightedSumReward([Constant(1.0), Length()])(["abc"], ["1"]).scores == [4.0]


def test_weighted_sum_details_merge_components() -> None:
    combined = WeightedSumReward([Length(), Constant(1.0)], [2.0, 1.0])
    assert combined(["ab"], ["1"]).details == [
        {
            "parsed_answer": "x",
            "status": "wrong",
            "reward": 5.0,
            "components": {"Length": 2.0, "Constant": 1.0},
        }
    ]


def test_weighted_sum_passes_columns() -> None:
    seen = {}

    class Spy(Reward):
        def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
            seen.update(columns)
            return [0.0] * len(completions)

    WeightedSumReward([Spy()])(["a"], ["b"], problem=["p"])
    assert seen == {"problem": ["p"]}


def test_weighted_sum_sub_reward_wrong_length_raises() -> None:
    class Broken:
        def __call__(self, completions: list[str], answers: list[str], **c: Any) -> list[float]:
            return [1.0]

    with pytest.raises(ValueError, match="^Broken returned 1 scores for 2 completions"):
        WeightedSumReward([Broken()])(["a", "b"], ["1", "2"])


def test_weighted_sum_sub_reward_non_number_names_it() -> None:
    class Verifier:
        def __call__(self, completions: list[str], answers: list[str], **c: Any) -> list[Any]:
            return [0.5, None]

    with pytest.raises(ValueError, match="^Verifier returned None for sample 1"):
        WeightedSumReward([Length(), Verifier()])(["a", "b"], ["1", "2"])


def test_weighted_sum_start_starts_children() -> None:
    started = []

    class Startable(Constant):
        def start(self) -> None:
            started.append(self.value)

    WeightedSumReward([Startable(1.0), Length(), Startable(2.0)]).start()
    assert started == [1.0, 2.0]


@pytest.mark.parametrize(
    ("rewards", "weights", "message"),
    [
        ([], None, r"rewards must be a non-empty list of rewards, got \[\]"),
        ([Length()], [1.0, 2.0], r"weights has 2 entries \(\[1.0, 2.0\]\) but there are 1"),
        ([Length(), Length()], [1.0], r"weights has 1 entries \(\[1.0\]\) but there are 2"),
        ([Length()], [float("nan")], r"weights\[0\] must be a finite number, got nan"),
        ([Length(), "x"], None, r"rewards\[1\] must be callable, got 'x'"),
    ],
)
def test_weighted_sum_bad_arguments_raise(
    rewards: list, weights: list | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WeightedSumReward(rewards, weights)


def test_weighted_sum_close_closes_children() -> None:
    closed = []

    class Closable(Constant):
        def close(self) -> None:
            closed.append(self.value)

    WeightedSumReward([Closable(1.0), Length(), Closable(2.0)]).close()
    assert closed == [1.0, 2.0]
