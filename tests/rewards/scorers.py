"""Worker-side scorers for the tests.

They are module-level functions so that the ``spawn``-ed scoring workers can import them.
"""

import os
import signal
import time

from dgpo.rewards.math_verify import verify_answer

#: An answer on which :func:`crash_or_verify` kills its worker process.
CRASH = "<crash the worker>"
#: An answer on which :func:`crash_or_verify` hangs where no signal handler can run.
HANG = "<hang in C>"


def crash_or_verify(gold: str, answer: str) -> str:
    """Like ``verify_answer``, but dies on :data:`CRASH` and hangs on :data:`HANG`."""
    if answer == CRASH:
        os._exit(1)
    if answer == HANG:
        # Block SIGALRM so the soft timeout cannot fire, as when C code never returns to Python.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    return verify_answer(gold, answer)


def raise_on_negative(value: int) -> int:
    """Return ``value`` doubled, or raise for a negative one."""
    if value < 0:
        raise ArithmeticError(f"negative: {value}")
    return 2 * value


def broken_self_test() -> None:
    """A worker initializer that fails as a broken math-verify installation would."""
    raise ImportError("LaTeX parser runtime is missing (a broken install)")
