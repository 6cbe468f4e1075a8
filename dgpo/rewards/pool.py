"""A reusable process pool that runs a scoring function with a hard per-task timeout.

Each worker is a fresh Python interpreter (``sys.executable -c``): never a fork, so it is safe next
to CUDA, vLLM and torch threads; and unlike ``multiprocessing``'s ``spawn`` it does not re-import
the caller's ``__main__``, so scripts and notebooks need no ``if __name__ == "__main__":`` guard. It
receives chunks of tasks over a socket and answers one message per task. Two timeouts guard each
task:

- soft: inside the worker, ``signal.setitimer`` raises an exception after ``timeout_s`` (the
  worker's main thread owns the signal, which math-verify's own ``signal.alarm`` timeouts need);
  the worker survives and goes on with the next task;
- hard: the parent knows when each task started (when the previous answer arrived) and kills the
  worker with ``SIGKILL`` ``kill_grace_s`` after the soft timeout, for code stuck in C that never
  returns to the interpreter.

A killed or crashed worker costs only the task it was running: its other tasks go back to the
queue and a fresh worker is started in the background while the others keep working. The first
failure of each kind (an exception type, a timeout, a killed or dead worker) is kept with its
traceback in :attr:`ScoringPool.failures` and logged once; later ones are only counted by the
caller. A worker whose ``initializer`` fails (e.g. a self-test of the scorer) stops the pool with
that traceback instead.
"""

import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from dgpo.rewards.pool_worker import CRASHED, READY, TIMEOUT, Failure, describe

logger = logging.getLogger(__name__)

# What a worker interpreter runs: take the parent's sys.path, then the worker's arguments.
_BOOTSTRAP = """
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
try:
    sys.path[:] = conn.recv()
    from dgpo.rewards.pool_worker import worker_main
    arguments = conn.recv()
except EOFError:  # the parent went away before the worker started
    sys.exit(0)
worker_main(conn, *arguments)
"""
_MAX_CHUNK = 64  # tasks sent to a worker at once; small enough to keep the workers balanced


def _kill_processes(processes: set[subprocess.Popen], owner_pid: int) -> None:
    """Kill the workers; a no-op in a forked child, whose copies of the handles are not its own."""
    if os.getpid() != owner_pid:
        return
    snapshot = list(processes)
    processes.clear()
    for process in snapshot:
        process.kill()
    for process in snapshot:
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # SIGKILL cannot be ignored; leave it to the OS
            pass


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    conn: Connection
    ready: bool = False
    since: float = field(default_factory=time.monotonic)  # spawn time, then current task's start
    inflight: deque[int] = field(default_factory=deque)  # task ids sent and not yet answered


@dataclass
class _Batch:
    """State of one :meth:`ScoringPool.map` call."""

    tasks: Sequence[tuple[Any, ...]]
    results: list[Any]
    pending: deque[int]
    remaining: int


class ScoringPool:
    """Runs ``fn(*task)`` for many tasks in worker processes, each task under a hard timeout.

    Workers start on the first :meth:`map` and are reused by later calls. They are killed by
    :meth:`close`, when the pool is garbage collected, and at interpreter exit; a closed pool
    starts new workers if it is used again. The pool is not thread-safe and cannot be pickled
    (owners drop it when pickled and build a new one lazily).

    Args:
        fn: A picklable module-level function; its return value must be picklable. It runs in
            the worker's main thread, so it may use ``signal`` based timeouts, but it must not
            install its own ``SIGALRM`` handler.
        num_workers: Number of worker processes.
        timeout_s: Soft per-task timeout in seconds (``SIGALRM`` in the worker).
        initializer: A picklable module-level function that each worker calls once before it
            takes tasks (e.g. to import and warm up a library outside any task's time budget,
            and to check that it works). If it raises or times out, :meth:`start` and
            :meth:`map` raise ``RuntimeError`` with its traceback.
        kill_grace_s: Seconds after ``timeout_s`` at which a worker still busy with the same task
            is killed.
        startup_timeout_s: Seconds a new worker may take to import and warm up.

    Raises:
        ValueError: If ``num_workers < 1``, a timeout is not positive, or ``fn`` or
            ``initializer`` cannot be pickled (a lambda or a local function).

    Example:
        >>> pool = ScoringPool(abs, num_workers=1, timeout_s=1.0)
        >>> pool.map([(-1,), (2,)])
        [1, 2]
        >>> pool.close()

    """

    def __init__(
        self,
        fn: Callable[..., Any],
        num_workers: int,
        timeout_s: float,
        initializer: Callable[[], Any] | None = None,
        kill_grace_s: float = 0.5,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        for name, value in [
            ("timeout_s", timeout_s),
            ("kill_grace_s", kill_grace_s),
            ("startup_timeout_s", startup_timeout_s),
        ]:
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        try:
            pickle.dumps((fn, initializer))
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise ValueError(
                f"fn and initializer must be picklable module-level functions, got {fn!r} and "
                f"{initializer!r} ({error})"
            ) from None
        self.fn = fn
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.initializer = initializer
        self.kill_grace_s = kill_grace_s
        self.startup_timeout_s = startup_timeout_s
        #: Workers killed or found dead since the pool was built.
        self.restarts = 0
        #: The first failure of each kind since the pool was built: kind -> traceback (or a
        #: description, for a worker that was killed or died). Each is logged when first seen.
        self.failures: dict[str, str] = {}
        self._owner_pid = os.getpid()
        self._workers: list[_Worker] = []
        # shared with the finalizer, so changed in place only
        self._processes: set[subprocess.Popen] = set()
        self._finalizer = weakref.finalize(self, _kill_processes, self._processes, self._owner_pid)

    def start(self) -> None:
        """Start the workers now and wait until each has run ``initializer``.

        Raises:
            RuntimeError: If a worker cannot start, or its ``initializer`` raises (with the
                traceback) or times out.

        """
        self._guarded(_Batch([], [], deque(), 0), 1, until_ready=True)

    def map(self, tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run ``fn(*task)`` for every task and return the results in order.

        Args:
            tasks: Argument tuples, one per task.

        Returns:
            One entry per task: ``fn``'s return value, :data:`TIMEOUT` if the task ran past
            its timeout, or :data:`CRASHED` if ``fn`` raised or its worker died.

        Raises:
            RuntimeError: If a worker cannot start (it exits or hangs during start-up, or its
                ``initializer`` fails), or the pool is used in a process other than the one that
                built it. If the call is interrupted (any exception, e.g. ``KeyboardInterrupt``),
                the workers are killed first, so that no stale answer reaches a later call.

        """
        batch = _Batch(tasks, [None] * len(tasks), deque(range(len(tasks))), len(tasks))
        chunk_size = max(1, min(_MAX_CHUNK, math.ceil(len(tasks) / (4 * self.num_workers))))
        self._guarded(batch, chunk_size, until_ready=False)
        return batch.results

    def _guarded(self, batch: _Batch, chunk_size: int, until_ready: bool) -> None:
        if os.getpid() != self._owner_pid:
            raise RuntimeError("ScoringPool was built in another process; build a new one here")
        try:
            self._run(batch, chunk_size, until_ready)
        except BaseException:  # e.g. Ctrl-C: the workers still hold tasks of this batch
            self.close()
            raise

    def _run(self, batch: _Batch, chunk_size: int, until_ready: bool) -> None:
        while len(self._workers) < self.num_workers:
            self._spawn()
        while batch.remaining or (until_ready and not all(w.ready for w in self._workers)):
            for worker in list(self._workers):
                if worker.ready and not worker.inflight and batch.pending:
                    self._dispatch(worker, batch, chunk_size)
            waiting = [w for w in self._workers if not w.ready or w.inflight]
            deadline = min(w.since + self._limit(w) for w in waiting)
            readable = wait(
                [w.conn for w in waiting], timeout=max(0.0, deadline - time.monotonic())
            )
            for worker in waiting:
                if worker.conn in readable:
                    self._drain(worker, batch)
            now = time.monotonic()
            for worker in waiting:
                overdue = now - worker.since > self._limit(worker)
                if worker in self._workers and overdue and not worker.conn.poll():
                    if not worker.ready:
                        self._discard(worker)
                        raise RuntimeError(
                            f"a scoring worker did not start within {self.startup_timeout_s} s"
                        )
                    self._fail(worker, batch, TIMEOUT, "timeout (worker killed)",
                               f"ran past {self.timeout_s:g} s + {self.kill_grace_s:g} s of grace "
                               "without answering (stuck outside the interpreter?); the worker "
                               "was killed")

    def close(self) -> None:
        """Kill the workers (a later :meth:`map` starts new ones)."""
        _kill_processes(self._processes, self._owner_pid)
        for worker in self._workers:
            worker.conn.close()
        self._workers.clear()

    def _limit(self, worker: _Worker) -> float:
        if not worker.ready:
            return self.startup_timeout_s
        return self.timeout_s + self.kill_grace_s

    def _spawn(self) -> None:
        parent_socket, child_socket = socket.socketpair()
        with child_socket:  # closed here once inherited, so that the worker's death reads as EOF
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_socket.fileno())],
                pass_fds=[child_socket.fileno()],
                stdin=subprocess.DEVNULL,
            )
        conn = Connection(parent_socket.detach())
        self._processes.add(process)
        self._workers.append(_Worker(process, conn))
        try:
            conn.send(sys.path)
            conn.send((self.fn, self.timeout_s, self.initializer))
        except OSError:  # died at once; reported by map() as a start-up failure
            pass

    def _discard(self, worker: _Worker) -> None:
        self._processes.discard(worker.process)
        self._workers.remove(worker)
        worker.conn.close()
        _kill_processes({worker.process}, self._owner_pid)

    def _dispatch(self, worker: _Worker, batch: _Batch, chunk_size: int) -> None:
        ids = [batch.pending.popleft() for _ in range(min(chunk_size, len(batch.pending)))]
        try:
            worker.conn.send([(i, batch.tasks[i]) for i in ids])
        except OSError:  # died while idle (e.g. the OOM killer): no task to blame
            batch.pending.extendleft(reversed(ids))
            self._restart(worker)
            return
        worker.inflight.extend(ids)
        worker.since = time.monotonic()

    def _drain(self, worker: _Worker, batch: _Batch) -> None:
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                worker.since = time.monotonic()
                if message[0] == READY:
                    self._on_ready(worker, message[1])
                    continue
                task_id, result, failure = message
                if worker.inflight.popleft() != task_id:  # pragma: no cover - protocol invariant
                    raise RuntimeError(f"scoring worker answered task {task_id} out of order")
                batch.results[task_id] = result
                batch.remaining -= 1
                if failure is not None:
                    self._record(*failure)
        except (EOFError, OSError):
            if not worker.ready:
                self._discard(worker)
                raise RuntimeError(
                    "a scoring worker exited during start-up (exit code "
                    f"{worker.process.returncode}); its error is printed above"
                ) from None
            self._fail(worker, batch, CRASHED, None, "")

    def _on_ready(self, worker: _Worker, failure: Failure | None) -> None:
        if failure is None:
            worker.ready = True
            return
        self._discard(worker)
        kind, text = failure
        raise RuntimeError(f"a scoring worker's initializer {self.initializer!r} failed "
                           f"({kind}), so the scorer cannot be trusted:\n{text}")

    def _fail(self, worker: _Worker, batch: _Batch, result: str, kind: str | None,
              what: str) -> None:
        """Blame ``result`` on the worker's current task, requeue the rest, restart it.

        ``kind`` and ``what`` describe the failure; ``kind=None``: the worker died (its exit
        code, known once it is reaped, names the kind).
        """
        blamed = worker.inflight.popleft() if worker.inflight else None
        if blamed is not None:
            batch.results[blamed] = result
            batch.remaining -= 1
            batch.pending.extendleft(reversed(worker.inflight))
            worker.inflight.clear()
        self._restart(worker)
        if kind is None:
            code = worker.process.returncode
            kind, what = f"worker died (exit code {code})", f"exited with code {code}"
        task = "no task" if blamed is None else describe(batch.tasks[blamed])
        self._record(kind, f"the scoring worker running {task} {what}")

    def _record(self, kind: str, text: str) -> None:
        """Keep and log the first failure of each kind."""
        if kind not in self.failures:
            self.failures[kind] = text
            logger.warning("scoring worker failure %r (the first of its kind; later ones are "
                           "only counted):\n%s", kind, text)

    def _restart(self, worker: _Worker) -> None:
        self._discard(worker)
        self.restarts += 1
        self._spawn()
