from typing import Any

import pytest
import yaml
from jsonargparse import ArgumentParser

from dgpo.rewards import MathVerifyReward, Reward, RewardFunction, WeightedSumReward


class PlainReward:
    """A user's reward: no dgpo base class, no annotations."""

    def __init__(self, scale=1.0):  # noqa: ANN001, ANN204
        self.scale = scale

    def __call__(self, completions, answers, **columns):  # noqa: ANN001, ANN003, ANN204
        return [self.scale * float(c == a) for c, a in zip(completions, answers, strict=True)]


class Echo(Reward):
    def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        return [float(len(c)) for c in completions]


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
    assert reward(["1", "2"], ["1", "1"]) == [2.0, 0.0]


def test_reward_function_builtin_rewards_from_yaml() -> None:
    config = {
        "reward": {
            "class_path": "dgpo.rewards.WeightedSumReward",
            "init_args": {
                "rewards": [
                    {
                        "class_path": "dgpo.rewards.MathVerifyReward",
                        "init_args": {"timeout_s": 2.0, "extraction": "lenient"},
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
    assert isinstance(reward.rewards[1], PlainReward)
    assert reward.weights == [1.0, 0.5]


def test_reward_base_checks_lengths() -> None:
    echo = Echo()
    assert echo(["ab", "c"], ["1", "2"], problem=["p", "q"], step=7) == [2.0, 1.0]
    with pytest.raises(ValueError, match="answers has 3 entries but there are 2 completions"):
        echo(["a", "b"], ["1", "2", "3"])
    with pytest.raises(ValueError, match="problem has 1 entries but there are 2 completions"):
        echo(["a", "b"], ["1", "2"], problem=["p"])


def test_reward_base_checks_output_length() -> None:
    class Short(Reward):
        def score(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
            return [0.0]

    with pytest.raises(ValueError, match="Short.score returned 1 rewards for 2 completions"):
        Short()(["a", "b"], ["1", "2"])


def test_reward_base_defaults() -> None:
    echo = Echo()
    assert echo.metrics() == {}
    assert echo.details() == []
    with echo as entered:
        assert entered is echo
    with pytest.raises(NotImplementedError, match="Reward must implement score"):
        Reward()(["a"], ["b"])
