"""Running the planned runs: one ``fit`` subprocess per run, resumed from its last checkpoint.

Each run folder gets a ``status.json`` (``state``: ``running``, ``finished``, ``failed`` or
``interrupted``; the exit code; the wall time summed over attempts) and a ``log.txt`` with the
run's output. A run whose state is ``finished`` is skipped; any other run with a checkpoint
resumes from it (``--ckpt_path``). Lightning ends a fit that receives SIGTERM (a SLURM time limit
or preemption) with exit code 0 (its ``SIGTERMException`` is a ``SystemExit``), so an attempt
whose output has Lightning's ``Received SIGTERM`` line counts as ``interrupted``, not finished.
Lightning's CSVLogger rewrites ``metrics.csv`` on resume, so the previous
attempt's file is kept as ``metrics-attempt<k>.csv`` first (:mod:`dgpo.sweep.collect` joins them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from dgpo.sweep.plan import Run

STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.csv"
#: What Lightning's signal connector logs when the fit receives SIGTERM (it then exits with 0).
SIGTERM_MARK = "Received SIGTERM"


@dataclass(frozen=True)
class Outcome:
    """What became of one attempt of a run: exit code, log, wall time, whether it was cut short."""

    run: Run
    returncode: int
    log: Path
    seconds: float
    skipped: bool = False
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """Whether the run has finished (exit code 0 and no SIGTERM)."""
        return self.returncode == 0 and not self.interrupted


def read_status(run_dir: Path) -> dict:
    """The run's ``status.json`` (``{"state": "planned"}`` when it has not started)."""
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"state": "planned"}


def is_finished(run_dir: Path) -> bool:
    """Whether the run completed its ``fit`` (exit code 0)."""
    return read_status(run_dir)["state"] == "finished"


def last_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/last.ckpt``, else the newest ``checkpoints/*.ckpt``, else ``None``."""
    directory = run_dir / "checkpoints"
    if (directory / "last.ckpt").is_file():
        return directory / "last.ckpt"
    ckpts = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts else None


def _write_status(run_dir: Path, status: dict) -> None:
    tmp = run_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    tmp.replace(run_dir / STATUS_FILE)


def _keep_previous_metrics(run_dir: Path) -> None:
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        attempt = len(list(run_dir.glob("metrics-attempt*.csv")))
        metrics.replace(run_dir / f"metrics-attempt{attempt}.csv")


def command(run: Run, ckpt: Path | None, python: str = sys.executable) -> list[str]:
    """The command line of one attempt of ``run`` (with ``--ckpt_path`` when resuming)."""
    resume = ["--ckpt_path", str(ckpt)] if ckpt is not None else []
    return [python, "-m", "dgpo", *run.fit_args, *resume]


def run_one(run: Run, python: str = sys.executable, threads: int | None = None) -> Outcome:
    """Run (or resume, or skip) one run and record its status.

    Args:
        run: the run.
        python: the interpreter that runs ``-m dgpo fit``.
        threads: ``OMP_NUM_THREADS`` of the run (``None``: the environment's).

    Returns:
        The outcome; ``skipped`` when the run had already finished.
    """
    run_dir = Path(run.run_dir)
    log = run_dir / LOG_FILE
    status = read_status(run_dir)
    if status["state"] == "finished":
        return Outcome(run, 0, log, 0.0, skipped=True)
    ckpt = last_checkpoint(run_dir)
    if ckpt is not None:
        _keep_previous_metrics(run_dir)
    cmd = command(run, ckpt, python)
    previous_seconds = float(status["wall_seconds"]) if "wall_seconds" in status else 0.0
    attempts = int(status["attempts"]) + 1 if "attempts" in status else 1
    _write_status(run_dir, {"state": "running", "attempts": attempts,
                            "wall_seconds": previous_seconds, "command": cmd})
    start = time.monotonic()
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        offset = handle.tell()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode
    seconds = time.monotonic() - start
    with log.open("rb") as handle:
        handle.seek(offset)
        interrupted = SIGTERM_MARK.encode() in handle.read()
    state = "failed" if code != 0 else "interrupted" if interrupted else "finished"
    _write_status(run_dir, {"state": state, "returncode": code, "attempts": attempts,
                            "wall_seconds": previous_seconds + seconds, "command": cmd,
                            "log": str(log)})
    return Outcome(run, code, log, seconds, interrupted=interrupted)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes = f"{rest // 60}m{rest % 60:02d}s"
    return f"{hours}h{minutes:>06}" if hours else minutes


def progress_line(done: int, total: int, outcome: Outcome, elapsed: float,
                  mean_seconds: float, parallel: int) -> str:
    """One line per finished run: which, how it ended, elapsed time and an estimate of what is left.

    The estimate is the mean time of the runs this sweep has run so far times the runs left,
    divided by the number running at once.
    """
    left = total - done
    eta = mean_seconds * left / max(1, min(parallel, left)) if left else 0.0
    if outcome.ok:
        state = "done"
    elif outcome.interrupted:
        state = f"INTERRUPTED (SIGTERM; it resumes when the sweep starts again, log {outcome.log})"
    else:
        state = f"FAILED (exit {outcome.returncode}, log {outcome.log})"
    return (f"[{done}/{total}] {outcome.run.run_id}: {state} in {_duration(outcome.seconds)} | "
            f"elapsed {_duration(elapsed)}, ~{_duration(eta)} left")


def run_local(runs: list[Run], parallel: int = 1, python: str = sys.executable,
              echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run the unfinished runs, ``parallel`` at a time, printing one progress line per run.

    With ``parallel`` above 1 and no ``OMP_NUM_THREADS`` in the environment, each run gets an
    equal share of the CPU cores as its ``OMP_NUM_THREADS`` (torch would otherwise start one
    thread per core in every run).

    Returns:
        The outcomes of the runs that were run (finished runs are skipped and not returned).

    Raises:
        ValueError: when ``parallel`` is below 1.
    """
    if parallel < 1:
        raise ValueError(f"--parallel {parallel}: expected 1 or more")
    pending = [run for run in runs if not is_finished(Path(run.run_dir))]
    if len(pending) < len(runs):
        echo(f"{len(runs) - len(pending)} of {len(runs)} runs already finished; skipping them")
    threads = None
    if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // parallel)
    start = time.monotonic()
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_one, run, python, threads) for run in pending]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            mean = sum(o.seconds for o in outcomes) / len(outcomes)
            echo(progress_line(len(outcomes), len(pending), outcome,
                               time.monotonic() - start, mean, parallel))
    return outcomes
