import copy
import logging
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from dgpo.rewards import MathVerifyReward, RewardFunction
from dgpo.rewards import math_verify as math_verify_module
from dgpo.rewards.pool import ScoringPool

from .scorers import CRASH, HANG, broken_self_test, crash_or_verify


class CrashyReward(MathVerifyReward):
    """MathVerifyReward whose workers crash or hang on the magic answers of ``scorers``."""

    _scorer = staticmethod(crash_or_verify)


class BrokenReward(MathVerifyReward):
    """MathVerifyReward whose workers' self-test fails as with a broken installation."""

    _initializer = staticmethod(broken_self_test)


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
    output = reward(completions, answers)
    assert output.scores == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    statuses = [d["status"] for d in output.details]
    assert statuses == ["correct", "wrong", "unparsed", "correct", "unparsed", "unparsed"]
    assert [d["parsed_answer"] for d in output.details] == ["42", "41", None, "0.5", None, None]
    assert output.correct == [True, False, False, True, False, False]
    metrics = output.metrics
    assert metrics["accuracy"] == pytest.approx(2 / 6)
    assert metrics["parse_failures"] == 3
    assert metrics["timeouts"] == 0 and metrics["worker_crashes"] == 0
    assert metrics["samples"] == 6
    assert output.reductions == {
        "samples": "sum", "accuracy": "mean", "boxed_fraction": "mean", "parse_failures": "sum",
        "timeouts": "sum", "worker_crashes": "sum", "worker_restarts": "sum",
    }


def test_math_verify_nested_braces(reward: MathVerifyReward) -> None:
    completions = [
        "$\\boxed{\\frac{1}{2}}$",
        "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        "\\boxed{\\{1, 2\\}}",
        "\\boxed{\\frac{\\sqrt{3}}{2}}",
    ]
    answers = ["0.5", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\{1,2\\}", "\\frac{\\sqrt3}2"]
    output = reward(completions, answers)
    assert output.scores == [1.0, 1.0, 1.0, 1.0]
    assert output.details[0]["parsed_answer"] == "\\frac{1}{2}"


def test_math_verify_last_boxed_wins(reward: MathVerifyReward) -> None:
    assert reward(["First \\boxed{3}, then \\boxed{4}."], ["4"]).scores == [1.0]
    assert reward(["First \\boxed{4}, then \\boxed{3}."], ["4"]).scores == [0.0]


def test_math_verify_lenient_falls_back_to_last_number() -> None:
    completions = ["3 apples and 1,250 pears", "We get 7, not \\boxed{8}", "no digits here"]
    with MathVerifyReward(num_workers=1, extraction="lenient") as lenient:
        output = lenient(completions, ["1250", "7", "1"])
    assert output.scores == [1.0, 0.0, 0.0]
    details = output.details
    assert [d["parsed_answer"] for d in details] == ["1250", "8", None]
    assert [d["boxed"] for d in details] == [False, True, False]


def test_math_verify_format_bonus_excluded_from_accuracy() -> None:
    completions = ["\\boxed{5}", "\\boxed{6}", "the answer is 5", "nothing"]
    answers = ["5"] * 4
    with MathVerifyReward(num_workers=1, extraction="lenient", format_reward=0.1) as shaped:
        output = shaped(completions, answers)
    assert output.scores == pytest.approx([1.1, 0.1, 1.0, 0.0])
    assert output.metrics["accuracy"] == pytest.approx(0.5)
    assert output.metrics["boxed_fraction"] == pytest.approx(0.5)
    assert output.correct == [True, False, True, False]


def test_math_verify_custom_reward_values() -> None:
    with MathVerifyReward(num_workers=1, correct_reward=2.0, wrong_reward=-1.0) as custom:
        output = custom(["\\boxed{1}", "\\boxed{2}", "none"], ["1", "1", "1"])
    assert output.scores == [2.0, -1.0, -1.0]


def test_math_verify_pathological_completion_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = MathVerifyReward(timeout_s=1.0, num_workers=2)
    nested = "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"
    completions = ["\\boxed{1}", nested, "\\boxed{\\frac{2}{4}}", nested, "\\boxed{3}", nested]
    sent: list[tuple[Any, ...]] = []
    real_map = ScoringPool.map

    def spy(pool: ScoringPool, tasks: list[tuple[Any, ...]]) -> list[Any]:
        sent.extend(tasks)
        return real_map(pool, tasks)

    monkeypatch.setattr(ScoringPool, "map", spy)
    try:
        output = fast(completions, ["1", "1", "0.5", "1", "4", "1"])
        assert output.scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        statuses = [d["status"] for d in output.details]
        assert statuses == ["correct", "timeout", "correct", "timeout", "wrong", "timeout"]
        assert output.metrics["timeouts"] == 3
        # the same pathological answer three times is checked once: one timeout, not three
        assert [task[1] for task in sent].count("(" * 3000 + "1" + ")" * 3000) == 1
        assert len(sent) == 4
        assert fast(["\\boxed{2}"], ["2"]).scores == [1.0]
    finally:
        fast.close()


def test_math_verify_hung_worker_is_killed(crashy: CrashyReward) -> None:
    completions = ["\\boxed{1}", f"\\boxed{{{HANG}}}"] + ["\\boxed{2}"] * 20
    output = crashy(completions, ["1", "1"] + ["2"] * 20)
    assert output.scores == [1.0, 0.0] + [1.0] * 20
    assert output.details[1]["status"] == "timeout"
    assert output.metrics["timeouts"] == 1
    assert output.metrics["worker_restarts"] == 1
    assert "timeout (worker killed)" in crashy._pool.failures
    assert crashy(["\\boxed{3}", "\\boxed{4}"], ["3", "5"]).scores == [1.0, 0.0]


def test_math_verify_worker_crash_costs_one_sample(crashy: CrashyReward) -> None:
    completions = ["\\boxed{1}"] * 10 + [f"\\boxed{{{CRASH}}}"] + ["\\boxed{2}"] * 10
    output = crashy(completions, ["1"] * 10 + ["1"] + ["2"] * 10)
    assert output.scores == [1.0] * 10 + [0.0] + [1.0] * 10
    assert output.details[10]["status"] == "crashed"
    assert output.metrics["worker_crashes"] == 1
    assert output.metrics["accuracy"] == pytest.approx(20 / 21)
    # later calls still work, including when every worker crashes
    output = crashy([f"\\boxed{{{CRASH}}}"] * 2, ["1", "2"])
    assert output.scores == [0.0, 0.0]
    assert output.metrics["worker_crashes"] == 2
    assert output.metrics["worker_restarts"] == 2
    output = crashy(["\\boxed{7}", "\\boxed{8}"], ["7", "7"])
    assert output.scores == [1.0, 0.0]
    assert output.metrics["worker_crashes"] == 0


def test_math_verify_crash_traceback_is_kept_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with CrashyReward(timeout_s=5.0, num_workers=1) as crashy, caplog.at_level(logging.WARNING):
        crashy([f"\\boxed{{{CRASH}}}", "\\boxed{1}"], ["1", "1"])
        crashy([f"\\boxed{{{CRASH}}}", "\\boxed{2}"], ["2", "2"])
        failures = crashy._pool.failures
    kinds = [kind for kind in failures if kind.startswith("worker died (exit code")]
    assert len(kinds) == 1, failures
    assert CRASH in failures[kinds[0]]  # names the task the worker was running
    logged = [r for r in caplog.records if r.name == "dgpo.rewards.pool"]
    assert len(logged) == 1 and kinds[0] in logged[0].getMessage()


def test_math_verify_too_many_failures_warn(caplog: pytest.LogCaptureFixture) -> None:
    with CrashyReward(timeout_s=5.0, num_workers=1) as crashy, caplog.at_level(logging.WARNING):
        crashy([f"\\boxed{{{CRASH}}}"] + ["\\boxed{1}"] * 10, ["1"] * 11)  # 1 of 11: 9 %
        quiet = [r for r in caplog.records if r.name == "dgpo.rewards.math_verify"]
        output = crashy([f"\\boxed{{{CRASH}}}", "\\boxed{1}"], ["1", "1"])  # 1 of 2: 50 %
    assert quiet == []
    assert output.scores == [0.0, 1.0]
    loud = [r for r in caplog.records if r.name == "dgpo.rewards.math_verify"]
    assert len(loud) == 1
    assert loud[0].getMessage().startswith(
        "CrashyReward: 1 of 2 samples (50%) crashed or timed out, more than "
        "max_failure_fraction=0.1")


def test_math_verify_too_many_failures_error_has_traceback() -> None:
    strict = CrashyReward(timeout_s=5.0, num_workers=1, on_failures="error",
                          max_failure_fraction=0.0)
    message = r"^CrashyReward: 1 of 3 samples \(33%\)"
    with strict, pytest.raises(RuntimeError, match=message) as info:
        strict([f"\\boxed{{{CRASH}}}", "\\boxed{1}", "\\boxed{2}"], ["1", "1", "2"])
    assert "--- first worker died (exit code" in str(info.value)
    assert CRASH in str(info.value)


def test_math_verify_broken_scorer_fails_at_start_with_traceback() -> None:
    broken = BrokenReward(num_workers=1)
    message = "initializer .* failed \\(ImportError\\)"
    with broken, pytest.raises(RuntimeError, match=message) as info:
        broken.start()
    assert "Traceback" in str(info.value)
    assert "LaTeX parser runtime is missing" in str(info.value)
    with broken, pytest.raises(RuntimeError, match="ImportError"):
        broken(["\\boxed{1}"], ["1"])  # no start(): the first call fails the same way


def test_math_verify_self_test_checks_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    # math-verify swallows its own errors and answers "unparsed": the self-test must not pass
    monkeypatch.setattr(math_verify_module, "verify_answer",
                        lambda gold, answer, raise_on_error=False: "unparsed")
    with pytest.raises(RuntimeError, match=r"math-verify self-test failed: verify_answer\("
                                           r"'\\\\frac\{1\}\{2\}', '0.5'\) returned 'unparsed'"):
        math_verify_module._init_worker()


def test_math_verify_start_runs_self_test_once_per_worker() -> None:
    with MathVerifyReward(num_workers=2) as reward:
        reward.start()
        pool = reward._pool
        assert pool is not None and all(worker.ready for worker in pool._workers)
        assert len(pool._workers) == 2
        reward.start()  # already started: a no-op
        assert reward._pool is pool and pool.restarts == 0


def test_math_verify_many_completions(reward: MathVerifyReward) -> None:
    # 3000 distinct (gold, answer) pairs, so that nothing is deduplicated
    completions = [f"Reasoning... so the answer is $\\boxed{{{i}}}$." for i in range(3000)]
    answers = [str(i if i % 3 else -i - 1) for i in range(3000)]
    output = reward(completions, answers)
    assert output.scores == [0.0 if i % 3 == 0 else 1.0 for i in range(3000)]
    assert output.metrics["samples"] == 3000 and output.metrics["timeouts"] == 0


def test_math_verify_empty_batch(reward: MathVerifyReward) -> None:
    output = reward([], [])
    assert output.scores == [] and output.details == [] and output.correct == []


def test_math_verify_length_mismatch_raises(reward: MathVerifyReward) -> None:
    with pytest.raises(ValueError, match="answers has 1 entries but there are 2 completions"):
        reward(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="problem has 3 entries"):
        reward(["a", "b"], ["1", "2"], problem=["p", "q", "r"])


def test_math_verify_ignores_extra_columns(reward: MathVerifyReward) -> None:
    assert reward(["\\boxed{2}"], ["2"], problem=["1+1?"], step=3).scores == [1.0]


def test_math_verify_pickle_and_deepcopy_recreate_pool(reward: MathVerifyReward) -> None:
    reward(["\\boxed{1}"], ["1"])
    clone = copy.deepcopy(reward)
    restored = pickle.loads(pickle.dumps(reward))
    try:
        for other in (clone, restored):
            assert other._pool is None
            assert other(["\\boxed{3}", "\\boxed{4}"], ["3", "3"]).scores == [1.0, 0.0]
            assert other._pool is not reward._pool
    finally:
        clone.close()
        restored.close()
    assert reward(["\\boxed{5}"], ["5"]).scores == [1.0]


def test_math_verify_close_then_reuse() -> None:
    reward = MathVerifyReward(num_workers=1)
    assert reward(["\\boxed{1}"], ["1"]).scores == [1.0]
    processes = list(reward._get_pool()._processes)
    reward.close()
    assert reward._pool is None
    assert all(p.poll() is not None for p in processes)
    assert reward(["\\boxed{2}"], ["2"]).scores == [1.0]
    reward.close()


def test_math_verify_is_a_reward_function() -> None:
    assert isinstance(MathVerifyReward(), RewardFunction)


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
        ({"max_failure_fraction": 1.5}, r"max_failure_fraction must be a number in \[0, 1\]"),
        ({"on_failures": "ignore"}, r"on_failures must be one of \('warn', 'error'\), got"),
    ],
)
def test_math_verify_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MathVerifyReward(**kwargs)
