"""The worker side of :class:`~dgpo.rewards.pool.ScoringPool`: one task at a time, under SIGALRM.

A worker interpreter runs :func:`worker_main`; the parent process imports only the constants and
:func:`describe`.
"""

import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

#: Result of a task that ran past its timeout.
TIMEOUT = "timeout"
#: Result of a task that raised, or whose worker died while running it.
CRASHED = "crashed"
#: A failure's kind (an exception type, ``"timeout"``, ...) and its traceback or description.
Failure = tuple[str, str]

#: A worker's first message, ``(READY, failure of its initializer or None)``.
READY = "ready"


class _SoftTimeout(BaseException):
    """Raised by ``SIGALRM`` in a worker; not an ``Exception``, so scored code cannot swallow it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _SoftTimeout


def run_task(
    fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float
) -> tuple[Any, Failure | None]:
    """``(fn(*args), None)``, or ``(TIMEOUT or CRASHED, (kind, traceback))``."""
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args), None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        where = traceback.format_exc()
        return TIMEOUT, ("timeout", f"{describe(args)} ran past {timeout_s:g} s; it was "
                                    f"interrupted in:\n{where}")
    except Exception as error:
        return CRASHED, (type(error).__name__, f"{describe(args)} raised:\n"
                                               f"{traceback.format_exc()}")


def describe(args: tuple[Any, ...], limit: int = 200) -> str:
    """Name a task by its arguments, shortened to ``limit`` characters."""
    text = repr(args)
    return f"task {text if len(text) <= limit else text[:limit] + '...'}"


def worker_main(
    conn: Connection,
    fn: Callable[..., Any],
    timeout_s: float,
    initializer: Callable[[], Any] | None,
) -> None:
    """Loop of one worker process: receive a chunk of ``(task_id, args)``, answer each task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGALRM, _on_alarm)
    failure = None
    if initializer is not None:  # pay lazy imports now, not in the first task's time budget
        _, failure = run_task(initializer, (), max(timeout_s, 60.0))
    try:
        conn.send((READY, failure))
        while (chunk := conn.recv()) is not None:
            for task_id, args in chunk:
                conn.send((task_id, *run_task(fn, args, timeout_s)))
    except (EOFError, OSError):  # the parent went away
        return
