import threading
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from dgpo.rewards import (
    MathVerifyReward,
    Reward,
    RewardFunction,
    RewardOutput,
    WeightedSumReward,
    call_reward,
)


class PlainReward:
    """A user's reward: no dgpo base class, no annotations."""

    def __init__(self, scale=1.0):  # noqa: ANN001, ANN204
        self.scale = scale

    def __call__(self, completions, answers, **columns):  # noqa: ANN001, ANN003, ANN204
        return [self.scale * float(c == a) for c, a in zip(completions, answers, strict=True)]


class Echo(Reward):
    def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        return [float(len(c)) for c in completions]


class Returns:
    """A reward that returns whatever it was given, whatever the batch."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> Any:
        return self.value


def _parse(config: dict) -> Any:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardFunction)
    parsed = parser.parse_string(yaml.safe_dump(config))
    return parser.instantiate(parsed).reward


def test_reward_function_plain_class_satisfies_protocol() -> None:
    assert isinstance(PlainReward(), RewardFunction)
    assert isinstance(Echo(), RewardFunction)
    assert isinstance(lambda completions, answers, **columns: [], RewardFunction)


def test_reward_function_plain_class_from_yaml_class_path() -> None:
    config = {
        "reward": {
            "class_path": f"{PlainReward.__module__}.PlainReward",
            "init_args": {"scale": 2.0},
        }
    }
    reward = _parse(config)
    assert isinstance(reward, PlainReward)
    assert call_reward(reward, ["1", "2"], ["1", "1"]).scores == [2.0, 0.0]


def test_reward_function_builtin_rewards_from_yaml() -> None:
    config = {
        "reward": {
            "class_path": "dgpo.rewards.WeightedSumReward",
            "init_args": {
                "rewards": [
                    {
                        "class_path": "dgpo.rewards.MathVerifyReward",
                        "init_args": {"timeout_s": 2.0, "extraction": "lenient",
                                      "on_failures": "error"},
                    },
                    {"class_path": f"{PlainReward.__module__}.PlainReward"},
                ],
                "weights": [1.0, 0.5],
            },
        }
    }
    reward = _parse(config)
    assert isinstance(reward, WeightedSumReward)
    assert isinstance(reward.rewards[0], MathVerifyReward)
    assert reward.rewards[0].extraction == "lenient"
    assert reward.rewards[0].on_failures == "error"
    assert isinstance(reward.rewards[1], PlainReward)
    assert reward.weights == [1.0, 0.5]


def test_reward_base_checks_lengths() -> None:
    echo = Echo()
    assert echo(["ab", "c"], ["1", "2"], problem=["p", "q"], step=7).scores == [2.0, 1.0]
    with pytest.raises(ValueError, match="answers has 3 entries but there are 2 completions"):
        echo(["a", "b"], ["1", "2", "3"])
    with pytest.raises(ValueError, match="problem has 1 entries but there are 2 completions"):
        echo(["a", "b"], ["1", "2"], problem=["p"])


def test_reward_base_checks_output_length() -> None:
    class Short(Reward):
        def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
            return [0.0]

    with pytest.raises(ValueError, match="^Short returned 1 scores for 2 completions"):
        Short()(["a", "b"], ["1", "2"])


def test_reward_base_defaults() -> None:
    echo = Echo()
    assert echo(["abc"], ["1"]) == RewardOutput(scores=[3.0])
    echo.start()  # nothing to start
    with echo as entered:
        assert entered is echo
    with pytest.raises(NotImplementedError, match="Reward must implement score"):
        Reward()(["a"], ["b"])


def test_reward_output_metric_without_reduction_is_a_mean() -> None:
    output = RewardOutput([1.0], metrics={"f1": 0.5, "n": 1.0}, reductions={"n": "sum"})
    assert output.reductions == {"f1": "mean", "n": "sum"}
    with pytest.raises(ValueError, match=r"reduction 'avg' of metric 'f1' is not one of \['mean'"):
        RewardOutput([1.0], metrics={"f1": 0.5}, reductions={"f1": "avg"})


def test_call_reward_plain_list_becomes_output() -> None:
    output = call_reward(PlainReward(), ["1", "2"], ["1", "1"], {"problem": ["p", "q"]})
    assert output == RewardOutput(scores=[1.0, 0.0])


@pytest.mark.parametrize(
    "scores",
    [[1, 0.5], (1, 0.5), torch.tensor([1.0, 0.5]), np.array([1.0, 0.5]), [True, 0.5],
     [np.float32(1.0), np.float64(0.5)]],
    ids=["ints", "tuple", "tensor", "ndarray", "bool", "numpy-scalars"],
)
def test_call_reward_accepts_sequences_of_numbers(scores: Any) -> None:
    output = call_reward(Returns(scores), ["a", "b"], ["1", "2"])
    assert output.scores == [1.0, 0.5]
    assert all(type(s) is float for s in output.scores)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0, None], r"^Returns returned None for sample 1: every score must be a finite number"),
        (["1.0", 0.0], r"^Returns returned '1.0' for sample 0: every score must be a finite"),
        ([0.0, float("nan")], r"^Returns returned nan for sample 1: every score must be a finite"),
        ([float("-inf"), 0.0], r"^Returns returned -inf for sample 0: every score must be"),
        ([[1.0], 0.0], r"^Returns returned \[1.0\] for sample 0"),
        ([1.0], r"^Returns returned 1 scores for 2 completions; a reward returns one score per"),
        ([1.0, 2.0, 3.0], r"^Returns returned 3 scores for 2 completions"),
        (None, r"^Returns returned None: a reward returns a RewardOutput or a list of 2 numbers"),
        (1.0, r"^Returns returned 1.0: a reward returns a RewardOutput or a list of 2 numbers"),
        ({"a": 1.0}, r"^Returns returned \{'a': 1.0\}: a reward returns a RewardOutput"),
        (RewardOutput([1.0, float("nan")]), r"^Returns returned nan for sample 1"),
        (RewardOutput([1.0, 0.0], details=[{}]), r"^Returns returned 1 details for 2"),
        (RewardOutput([1.0, 0.0], correct=[True]), r"^Returns returned correct=\[True\] for 2"),
        (RewardOutput([1.0, 0.0], correct=["yes", "no"]), r"^Returns returned correct="),
        (RewardOutput([1.0, 0.0], metrics={"f1": None}), r"^Returns returned metric 'f1' = None"),
    ],
)
def test_call_reward_bad_output_names_reward_sample_and_value(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call_reward(Returns(value), ["a", "b"], ["1", "2"])


def test_call_reward_bad_output_message_shows_the_completion() -> None:
    with pytest.raises(ValueError, match=r"\(completion 'second'\)"):
        call_reward(Returns([0.0, None]), ["first", "second"], ["1", "2"])


def test_call_reward_function_reward_is_named_by_its_function_name() -> None:
    def my_verifier(completions: list[str], answers: list[str]) -> list[Any]:
        return [None] * len(completions)

    with pytest.raises(ValueError, match="^my_verifier returned None for sample 0"):
        call_reward(my_verifier, ["a"], ["1"])


def test_call_reward_checks_input_lengths() -> None:
    with pytest.raises(ValueError, match="answers has 1 entries but there are 2 completions"):
        call_reward(PlainReward(), ["a", "b"], ["1"])


def test_call_reward_blocked_reward_times_out_naming_it() -> None:
    release = threading.Event()

    class RemoteVerifier:
        def __call__(self, completions: list[str], answers: list[str]) -> list[float]:
            release.wait()  # a server that never answers
            return [0.0] * len(completions)

    try:
        with pytest.raises(RuntimeError, match=r"^reward RemoteVerifier did not return within "
                                               r"timeout_s=0.2 s \(a batch of 1 completions\)"):
            call_reward(RemoteVerifier(), ["a"], ["1"], timeout_s=0.2)
    finally:
        release.set()  # let the abandoned thread end


def test_call_reward_reraises_the_reward_exception() -> None:
    class Broken:
        def __call__(self, completions: list[str], answers: list[str]) -> list[float]:
            raise KeyError("verifier lost its key")

    with pytest.raises(KeyError, match="verifier lost its key"):
        call_reward(Broken(), ["a"], ["1"])


def test_call_reward_thread_keeps_grad_mode_and_none_runs_in_caller_thread() -> None:
    seen: list[tuple[bool, bool]] = []

    def spy(completions: list[str], answers: list[str]) -> list[float]:
        seen.append((torch.is_grad_enabled(), threading.current_thread() is caller))
        return [0.0] * len(completions)

    caller = threading.current_thread()
    with torch.no_grad():
        call_reward(spy, ["a"], ["1"])
    call_reward(spy, ["a"], ["1"], timeout_s=None)
    assert seen == [(False, False), (True, True)]


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), "10", True])
def test_call_reward_bad_timeout_raises(timeout_s: Any) -> None:
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0 or None"):
        call_reward(PlainReward(), ["a"], ["1"], timeout_s=timeout_s)
