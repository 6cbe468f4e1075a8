"""The sweep as a SLURM job array: an sbatch script with one run per array task.

Array task ``i`` runs ``python -m dgpo sweep --run <out>/runs/<id_i>``, the same code path as a
local sweep: it skips a finished run, resumes an unfinished one from its last checkpoint, and
records ``status.json``, so a requeued or resubmitted task continues where it stopped. A second,
dependent job rebuilds the report when the array has ended (``afterany``: also when a run failed).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dgpo.sweep.plan import Run

ARRAY_SCRIPT = "sweep.sbatch"
REPORT_SCRIPT = "report.sbatch"


@dataclass(frozen=True)
class SlurmOptions:
    """The resources of each array task.

    Attributes:
        partition: ``--partition`` (``None``: the cluster's default).
        time: ``--time`` per run, e.g. ``"04:00:00"``.
        gpus: ``--gpus-per-task`` (0: none requested).
        cpus: ``--cpus-per-task``.
        mem: ``--mem``, e.g. ``"32G"`` (``None``: the cluster's default).
        max_running: the array's ``%`` throttle (``None``: no limit).
        setup: shell lines run before each run (``module load``, ``source .venv/bin/activate``).
        extra: further ``#SBATCH`` options, e.g. ``["--account=abc", "--qos=normal"]``.
    """

    partition: str | None = None
    time: str = "04:00:00"
    gpus: int = 0
    cpus: int = 4
    mem: str | None = None
    max_running: int | None = None
    setup: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()


def _directives(name: str, options: SlurmOptions) -> list[str]:
    lines = [f"--job-name={name}", f"--time={options.time}", "--ntasks=1",
             f"--cpus-per-task={options.cpus}"]
    if options.partition:
        lines.append(f"--partition={options.partition}")
    if options.gpus:
        lines.append(f"--gpus-per-task={options.gpus}")
    if options.mem:
        lines.append(f"--mem={options.mem}")
    lines += list(options.extra)
    return [f"#SBATCH {line}" for line in lines]


def array_script(runs: list[Run], out: Path, options: SlurmOptions,
                 python: str = sys.executable) -> str:
    """The sbatch script of the job array: task ``i`` runs ``runs[i]``.

    Raises:
        ValueError: when ``runs`` is empty.
    """
    if not runs:
        raise ValueError("no runs to submit: every run of the sweep has finished")
    out = out.resolve()
    throttle = f"%{options.max_running}" if options.max_running else ""
    logs = out / "slurm"
    lines = ["#!/bin/bash", *_directives(f"dgpo-sweep-{out.name}", options),
             f"#SBATCH --array=0-{len(runs) - 1}{throttle}",
             f"#SBATCH --output={logs}/%A_%a.out", "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}", *options.setup, "RUNS=("]
    lines += [f"  {shlex.quote(run.run_dir)}" for run in runs]
    lines += [")", f"exec {shlex.quote(python)} -m dgpo sweep --run "
                   '"${RUNS[$SLURM_ARRAY_TASK_ID]}"']
    return "\n".join(lines) + "\n"


def report_script(out: Path, options: SlurmOptions, python: str = sys.executable) -> str:
    """The sbatch script of the job that rebuilds the report once the array has ended."""
    out = out.resolve()
    report = SlurmOptions(partition=options.partition, time="00:30:00", cpus=1,
                          setup=options.setup, extra=options.extra)
    lines = ["#!/bin/bash", *_directives(f"dgpo-report-{out.name}", report),
             f"#SBATCH --output={out}/slurm/report_%j.out", "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}", *options.setup,
             f"exec {shlex.quote(python)} -m dgpo sweep --report {shlex.quote(str(out))}"]
    return "\n".join(lines) + "\n"


def write_scripts(runs: list[Run], out: Path, options: SlurmOptions,
                  python: str = sys.executable) -> tuple[Path, Path]:
    """Write ``sweep.sbatch`` and ``report.sbatch`` into ``out``; returns their paths."""
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    array = out / ARRAY_SCRIPT
    array.write_text(array_script(runs, out, options, python))
    report = out / REPORT_SCRIPT
    report.write_text(report_script(out, options, python))
    return array, report


def submit(array: Path, report: Path, sbatch: str = "sbatch") -> tuple[str, str]:
    """Submit the array, then the report job after it (``afterany``); returns both job ids.

    Raises:
        RuntimeError: when ``sbatch`` is missing or refuses a script (its message is included).
    """
    job_ids = []
    dependency: list[str] = []
    for script in (array, report):
        try:
            result = subprocess.run([sbatch, "--parsable", *dependency, str(script)],
                                    capture_output=True, text=True, check=False)
        except FileNotFoundError as error:
            raise RuntimeError(f"sbatch {sbatch!r} not found: submit {array} on a SLURM "
                               "login node, or pass --slurm-no-submit to only write the "
                               "script") from error
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed with exit code {result.returncode}: "
                               f"{result.stderr.strip()}")
        job_ids.append(result.stdout.strip().split(";")[0])
        dependency = [f"--dependency=afterany:{job_ids[0]}"]
    return job_ids[0], job_ids[1]
