import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from dgpo.rewards import pool as pool_module
from dgpo.rewards.pool import CRASHED, ScoringPool

from .scorers import broken_self_test, raise_on_negative

REPO = Path(__file__).resolve().parents[2]


def test_scoring_pool_keeps_first_traceback_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    pool = ScoringPool(raise_on_negative, num_workers=1, timeout_s=5.0)
    try:
        with caplog.at_level(logging.WARNING, logger="dgpo.rewards.pool"):
            assert pool.map([(-1,), (2,), (-2,)]) == [CRASHED, 4, CRASHED]
            assert pool.map([(-3,)]) == [CRASHED]
        assert list(pool.failures) == ["ArithmeticError"]
        text = pool.failures["ArithmeticError"]
        assert text.startswith("task (-1,) raised:\nTraceback (most recent call last):")
        assert "ArithmeticError: negative: -1" in text  # the first one, not a later one
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 1 and "'ArithmeticError'" in logged[0] and "negative: -1" in logged[0]
    finally:
        pool.close()


def test_scoring_pool_failing_initializer_raises_with_traceback() -> None:
    pool = ScoringPool(abs, num_workers=2, timeout_s=5.0, initializer=broken_self_test)
    with pytest.raises(RuntimeError, match=r"initializer .*broken_self_test.* failed "
                                           r"\(ImportError\)") as info:
        pool.start()
    assert "Traceback (most recent call last)" in str(info.value)
    assert "LaTeX parser runtime is missing" in str(info.value)
    assert pool._processes == set()  # no worker left behind
    with pytest.raises(RuntimeError, match="ImportError"):
        pool.map([(-1,)])


def test_scoring_pool_start_makes_every_worker_ready() -> None:
    pool = ScoringPool(abs, num_workers=2, timeout_s=5.0)
    try:
        pool.start()
        assert len(pool._workers) == 2 and all(w.ready for w in pool._workers)
        assert pool.map([(-4,)]) == [4] and pool.restarts == 0
    finally:
        pool.close()


def test_scoring_pool_keeps_order_and_reports_exceptions() -> None:
    pool = ScoringPool(raise_on_negative, num_workers=2, timeout_s=5.0)
    try:
        values = list(range(-3, 200))
        expected = [CRASHED if v < 0 else 2 * v for v in values]
        assert pool.map([(v,) for v in values]) == expected
        assert pool.restarts == 0  # an exception does not cost the worker
        assert pool.map([]) == []
        assert pool.map([(5,)]) == [10]
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0}, "num_workers must be an integer >= 1, got 0"),
        ({"timeout_s": 0.0}, "timeout_s must be > 0 seconds, got 0.0"),
        ({"kill_grace_s": -1}, "kill_grace_s must be > 0 seconds, got -1"),
        ({"fn": lambda x: x}, "fn and initializer must be picklable module-level functions"),
    ],
)
def test_scoring_pool_bad_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"fn": abs, "num_workers": 1, "timeout_s": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        ScoringPool(**arguments)


def _run_script(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter; a script that hangs fails the test (TimeoutExpired)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5.0
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
        time.sleep(0.05)
    assert not alive, f"worker processes {alive} outlived the interpreter"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to look for leftover workers")
def test_scoring_pool_workers_stop_at_interpreter_exit() -> None:
    # no close() and no __main__ guard: the workers must go when the interpreter exits
    result = _run_script(
        """
        from dgpo.rewards import MathVerifyReward
        reward = MathVerifyReward(num_workers=2)
        assert reward(["\\\\boxed{1}"], ["1"]).scores == [1.0]
        print(*[p.pid for p in reward._pool._processes])
        """
    )
    assert result.returncode == 0, result.stderr
    _assert_gone([int(pid) for pid in result.stdout.split()])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to look for leftover workers")
def test_scoring_pool_exit_does_not_wait_for_hung_worker() -> None:
    # a worker stuck in a task with a long timeout is killed at exit, not waited for (waiting
    # would outlast _run_script's limit)
    result = _run_script(
        """
        import threading, time
        from rewards.scorers import HANG, crash_or_verify
        from dgpo.rewards.pool import ScoringPool
        pool = ScoringPool(crash_or_verify, num_workers=1, timeout_s=3600.0)
        pool.map([("1", "1")])
        print(*[p.pid for p in pool._processes], flush=True)
        threading.Thread(target=pool.map, args=([("1", HANG)],), daemon=True).start()
        time.sleep(0.5)
        """
    )
    assert result.returncode == 0, result.stderr
    _assert_gone([int(pid) for pid in result.stdout.split()])


def test_scoring_pool_interrupted_call_leaves_no_stale_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = ScoringPool(raise_on_negative, num_workers=2, timeout_s=5.0)
    try:
        pool.map([(1,)])  # workers ready
        real_wait = pool_module.wait

        def interrupt(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(pool_module, "wait", real_wait)
            raise KeyboardInterrupt

        monkeypatch.setattr(pool_module, "wait", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pool.map([(v,) for v in range(100)])  # interrupted with tasks in flight
        assert pool.map([(v,) for v in range(100, 300)]) == [2 * v for v in range(100, 300)]
    finally:
        pool.close()
