import copy
import pickle
import time
from collections.abc import Iterator

import pytest

from dgpo.rewards import MathVerifyReward, RewardFunction

from .scorers import CRASH, HANG, crash_or_verify


class CrashyReward(MathVerifyReward):
    """MathVerifyReward whose workers crash or hang on the magic answers of ``scorers``."""

    _scorer = staticmethod(crash_or_verify)


@pytest.fixture(scope="module")
def reward() -> Iterator[MathVerifyReward]:
    reward = MathVerifyReward(timeout_s=5.0, num_workers=2)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def crashy() -> Iterator[CrashyReward]:
    reward = CrashyReward(timeout_s=1.0, num_workers=2)
    yield reward
    reward.close()


def test_math_verify_correct_wrong_unparsed(reward: MathVerifyReward) -> None:
    completions = [
        "The answer is $\\boxed{42}$.",
        "So we get \\boxed{41}.",
        "I do not know.",
        "Thus \\boxed{0.5}",
        "The answer is 42.",  # boxed extraction ignores bare numbers
        "Truncated \\boxed{4",
    ]
    answers = ["42", "42", "42", "\\frac{1}{2}", "42", "4"]
    assert reward(completions, answers) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    statuses = [d["status"] for d in reward.details()]
    assert statuses == ["correct", "wrong", "unparsed", "correct", "unparsed", "unparsed"]
    assert [d["parsed_answer"] for d in reward.details()] == ["42", "41", None, "0.5", None, None]
    metrics = reward.metrics()
    assert metrics["accuracy"] == pytest.approx(2 / 6)
    assert metrics["parse_failures"] == 3
    assert metrics["timeouts"] == 0 and metrics["worker_crashes"] == 0
    assert metrics["samples"] == 6


def test_math_verify_nested_braces(reward: MathVerifyReward) -> None:
    completions = [
        "$\\boxed{\\frac{1}{2}}$",
        "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        "\\boxed{\\{1, 2\\}}",
        "\\boxed{\\frac{\\sqrt{3}}{2}}",
    ]
    answers = ["0.5", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\{1,2\\}", "\\frac{\\sqrt3}2"]
    assert reward(completions, answers) == [1.0, 1.0, 1.0, 1.0]
    assert reward.details()[0]["parsed_answer"] == "\\frac{1}{2}"


def test_math_verify_last_boxed_wins(reward: MathVerifyReward) -> None:
    assert reward(["First \\boxed{3}, then \\boxed{4}."], ["4"]) == [1.0]
    assert reward(["First \\boxed{4}, then \\boxed{3}."], ["4"]) == [0.0]


def test_math_verify_lenient_falls_back_to_last_number() -> None:
    completions = ["3 apples and 1,250 pears", "We get 7, not \\boxed{8}", "no digits here"]
    with MathVerifyReward(num_workers=1, extraction="lenient") as lenient:
        assert lenient(completions, ["1250", "7", "1"]) == [1.0, 0.0, 0.0]
        details = lenient.details()
    assert [d["parsed_answer"] for d in details] == ["1250", "8", None]
    assert [d["boxed"] for d in details] == [False, True, False]


def test_math_verify_format_bonus_excluded_from_accuracy() -> None:
    completions = ["\\boxed{5}", "\\boxed{6}", "the answer is 5", "nothing"]
    answers = ["5"] * 4
    with MathVerifyReward(num_workers=1, extraction="lenient", format_reward=0.1) as shaped:
        rewards = shaped(completions, answers)
        metrics = shaped.metrics()
    assert rewards == pytest.approx([1.1, 0.1, 1.0, 0.0])
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["boxed_fraction"] == pytest.approx(0.5)


def test_math_verify_custom_reward_values() -> None:
    with MathVerifyReward(num_workers=1, correct_reward=2.0, wrong_reward=-1.0) as custom:
        rewards = custom(["\\boxed{1}", "\\boxed{2}", "none"], ["1", "1", "1"])
    assert rewards == [2.0, -1.0, -1.0]


def test_math_verify_pathological_completion_times_out(reward: MathVerifyReward) -> None:
    fast = MathVerifyReward(timeout_s=1.0, num_workers=2)
    nested = "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"
    # the same pathological answer three times: checked once, so the call takes one timeout
    completions = ["\\boxed{1}", nested, "\\boxed{\\frac{2}{4}}", nested, "\\boxed{3}", nested]
    try:
        fast(["\\boxed{1}"], ["1"])  # start the workers outside the timed call
        start = time.monotonic()
        rewards = fast(completions, ["1", "1", "0.5", "1", "4", "1"])
        elapsed = time.monotonic() - start
        assert rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        statuses = [d["status"] for d in fast.details()]
        assert statuses == ["correct", "timeout", "correct", "timeout", "wrong", "timeout"]
        assert fast.metrics()["timeouts"] == 3
        assert elapsed < 4.0  # 1 s timeout (+ 0.5 s grace if the worker has to be killed)
        assert fast(["\\boxed{2}"], ["2"]) == [1.0]
    finally:
        fast.close()


def test_math_verify_hung_worker_is_killed(crashy: CrashyReward) -> None:
    crashy(["\\boxed{1}"], ["1"])  # start the workers outside the timed call
    completions = ["\\boxed{1}", f"\\boxed{{{HANG}}}"] + ["\\boxed{2}"] * 20
    start = time.monotonic()
    rewards = crashy(completions, ["1", "1"] + ["2"] * 20)
    elapsed = time.monotonic() - start
    assert rewards == [1.0, 0.0] + [1.0] * 20
    assert crashy.details()[1]["status"] == "timeout"
    assert crashy.metrics()["timeouts"] == 1
    assert crashy.metrics()["worker_restarts"] == 1
    assert elapsed < 5.0  # killed 0.5 s after the 1 s soft timeout
    assert crashy(["\\boxed{3}", "\\boxed{4}"], ["3", "5"]) == [1.0, 0.0]


def test_math_verify_worker_crash_costs_one_sample(crashy: CrashyReward) -> None:
    completions = ["\\boxed{1}"] * 10 + [f"\\boxed{{{CRASH}}}"] + ["\\boxed{2}"] * 10
    rewards = crashy(completions, ["1"] * 10 + ["1"] + ["2"] * 10)
    assert rewards == [1.0] * 10 + [0.0] + [1.0] * 10
    assert crashy.details()[10]["status"] == "crashed"
    assert crashy.metrics()["worker_crashes"] == 1
    assert crashy.metrics()["accuracy"] == pytest.approx(20 / 21)
    # later calls still work, including when every worker crashes
    assert crashy([f"\\boxed{{{CRASH}}}"] * 2, ["1", "2"]) == [0.0, 0.0]
    assert crashy.metrics()["worker_crashes"] == 2
    assert crashy.metrics()["worker_restarts"] == 2
    assert crashy(["\\boxed{7}", "\\boxed{8}"], ["7", "7"]) == [1.0, 0.0]
    assert crashy.metrics()["worker_crashes"] == 0


def test_math_verify_many_completions_fast(reward: MathVerifyReward) -> None:
    reward(["\\boxed{1}"], ["1"])  # warm workers
    # 3000 distinct (gold, answer) pairs, so that nothing is deduplicated
    completions = [f"Reasoning... so the answer is $\\boxed{{{i}}}$." for i in range(3000)]
    answers = [str(i if i % 3 else -i - 1) for i in range(3000)]
    start = time.monotonic()
    rewards = reward(completions, answers)
    elapsed = time.monotonic() - start
    assert rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(3000)]
    assert elapsed < 15.0


def test_math_verify_empty_batch(reward: MathVerifyReward) -> None:
    assert reward([], []) == []
    assert reward.details() == []


def test_math_verify_length_mismatch_raises(reward: MathVerifyReward) -> None:
    with pytest.raises(ValueError, match="answers has 1 entries but there are 2 completions"):
        reward(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="problem has 3 entries"):
        reward(["a", "b"], ["1", "2"], problem=["p", "q", "r"])


def test_math_verify_ignores_extra_columns(reward: MathVerifyReward) -> None:
    assert reward(["\\boxed{2}"], ["2"], problem=["1+1?"], step=3) == [1.0]


def test_math_verify_pickle_and_deepcopy_recreate_pool(reward: MathVerifyReward) -> None:
    reward(["\\boxed{1}"], ["1"])
    clone = copy.deepcopy(reward)
    restored = pickle.loads(pickle.dumps(reward))
    try:
        for other in (clone, restored):
            assert other._pool is None
            assert other(["\\boxed{3}", "\\boxed{4}"], ["3", "3"]) == [1.0, 0.0]
            assert other._pool is not reward._pool
    finally:
        clone.close()
        restored.close()
    assert reward(["\\boxed{5}"], ["5"]) == [1.0]


def test_math_verify_close_then_reuse() -> None:
    reward = MathVerifyReward(num_workers=1)
    assert reward(["\\boxed{1}"], ["1"]) == [1.0]
    processes = list(reward._get_pool()._processes)
    reward.close()
    assert reward._pool is None
    assert all(p.poll() is not None for p in processes)
    assert reward(["\\boxed{2}"], ["2"]) == [1.0]
    reward.close()


def test_math_verify_is_a_reward_function() -> None:
    assert isinstance(MathVerifyReward(), RewardFunction)
    assert MathVerifyReward().metrics() == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0}, "timeout_s must be a number of seconds > 0, got 0"),
        ({"timeout_s": -1.5}, "got -1.5"),
        ({"timeout_s": float("inf")}, "got inf"),
        ({"num_workers": 0}, "num_workers must be an integer >= 1, got 0"),
        ({"num_workers": 1.5}, "got 1.5"),
        ({"extraction": "last"}, r"extraction must be one of \('boxed', 'lenient'\), got 'last'"),
        ({"format_reward": float("nan")}, "format_reward must be a finite number, got nan"),
        ({"correct_reward": "1"}, "correct_reward must be a finite number, got '1'"),
    ],
)
def test_math_verify_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MathVerifyReward(**kwargs)
