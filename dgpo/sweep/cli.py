r"""``python -m dgpo sweep``: losses × seeds (× a grid) of ordinary ``fit`` runs, with statistics.

Example:
    python -m dgpo sweep --config configs/tiny.yaml --losses grpo dgpo configs/losses/cispo.yaml \
        --seeds 0 1 2 --out runs/sweeps/demo --set trainer.max_epochs=30
    python -m dgpo sweep --report runs/sweeps/demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from dgpo.sweep.collect import LAST_EPOCHS, collect
from dgpo.sweep.curves import plot_curves
from dgpo.sweep.execute import command, last_checkpoint, read_status, run_local, run_one
from dgpo.sweep.plan import (
    RUN_FILE,
    Run,
    parse_assignment,
    parse_grid,
    plan_runs,
    read_runs,
    read_sweep,
    write_run,
    write_sweep,
)
from dgpo.sweep.report import comparison_table, render_report, summary_table
from dgpo.sweep.slurm import SlurmOptions, submit, write_scripts
from dgpo.sweep.stats import CI_METHODS

SUMMARY_FILE = "summary.csv"
REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"


def build_parser() -> argparse.ArgumentParser:
    """The sweep's argument parser."""
    parser = argparse.ArgumentParser(
        prog="dgpo sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every loss × seed (× grid point) as an ordinary `dgpo fit` in its own\n"
                    "folder under --out/runs, then write summary.csv, report.md and curves.png.\n"
                    "Started again, it skips finished runs and resumes the others from their\n"
                    f"last checkpoint. 'Final' metrics average the last {LAST_EPOCHS} epochs.",
        epilog=__doc__.split("Example:")[1])
    parser.add_argument("--config", help="the task config (as for `dgpo fit --config`)")
    parser.add_argument("--losses", nargs="+", metavar="LOSS",
                        help="built-in loss names (grpo, dgpo, ...) or loss config files")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="seed_everything of the runs, e.g. 0 1 2")
    parser.add_argument("--out", help="the sweep folder, e.g. runs/sweeps/<name>")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run (dotted config key); repeatable")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis: each value is a method of its own per loss; repeatable")
    parser.add_argument("--parallel", type=int, default=None, metavar="N",
                        help="runs at once (local default 1; with --slurm: the array's throttle)")
    parser.add_argument("--baseline", default=None,
                        help="the loss the others are compared with (default: grpo, else the "
                             "first loss)")
    parser.add_argument("--ci", choices=CI_METHODS, default="t",
                        help="interval across seeds: Student t (default) or percentile bootstrap")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan the runs and print their commands; run nothing")
    parser.add_argument("--report", metavar="OUT",
                        help="only rebuild the report of the sweep in OUT from its finished runs")
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="run (or resume) the one run planned in RUN_DIR (SLURM array tasks)")
    slurm = parser.add_argument_group("SLURM (one run per array task)")
    slurm.add_argument("--slurm", action="store_true",
                       help="write <out>/sweep.sbatch (job array) and report.sbatch, and submit")
    slurm.add_argument("--slurm-no-submit", action="store_true",
                       help="with --slurm: only write the scripts")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", default="04:00:00", help="time limit per run")
    slurm.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per run")
    slurm.add_argument("--slurm-cpus", type=int, default=4, help="CPUs per run")
    slurm.add_argument("--slurm-mem", default=None, help="memory per run, e.g. 32G")
    slurm.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="a shell line run before each run, e.g. 'source .venv/bin/activate'")
    slurm.add_argument("--slurm-option", action="append", default=[], metavar="OPTION",
                       help="a further #SBATCH option, e.g. --account=abc; repeatable")
    return parser


def _baseline_of(run: Run, baseline: str) -> str:
    return " ".join([baseline, *(f"{key}={value}" for key, value in run.grid)])


def _progress(runs: list[Run]) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {"finished": [], "failed": [], "unfinished": []}
    for run in runs:
        state = read_status(Path(run.run_dir))["state"]
        states[state if state in ("finished", "failed") else "unfinished"].append(run.run_id)
    return states


def write_report(out: Path, baseline: str | None = None) -> list[Path]:
    """Write ``summary.csv``, ``report.md`` and ``curves.png`` from the finished runs in ``out``.

    Args:
        out: the sweep folder.
        baseline: the baseline loss (``None``: the one in ``sweep.json``).

    Returns:
        The three paths.

    Raises:
        ValueError: when ``out`` is not a sweep folder or the baseline is not one of its losses.
    """
    settings = read_sweep(out)
    baseline = baseline or settings["baseline"]
    order = [Path(loss).stem for loss in settings["losses"]]  # a loss's method name, as planned
    runs = sorted(read_runs(out), key=lambda r: order.index(r.method.split(" ")[0])
                  if r.method.split(" ")[0] in order else len(order))
    labels = {run.method.split(" ")[0] for run in runs}
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r}: not a loss of this sweep; its losses: "
                         f"{sorted(labels)}")
    settings = {**settings, "baseline": baseline}
    scalars, curves = collect(runs)
    level, ci = settings["level"], settings["ci"]
    summary = summary_table(scalars, level, ci)
    pairs = {run.method: _baseline_of(run, baseline) for run in runs}
    comparison = comparison_table(scalars, pairs, level, ci)
    summary.to_csv(out / SUMMARY_FILE, index=False)
    (out / REPORT_FILE).write_text(render_report(summary, comparison, settings, _progress(runs),
                                                 level, ci))
    plot_curves(curves, out / CURVES_FILE, level, ci)
    return [out / SUMMARY_FILE, out / REPORT_FILE, out / CURVES_FILE]


def _run_single(run_dir: Path, python: str) -> int:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ValueError(f"--run {str(run_dir)!r}: no {RUN_FILE} there; "
                         "is it a sweep's run folder?")
    run = Run.from_json(json.loads(path.read_text()))
    outcome = run_one(run, python)
    how = ("already finished" if outcome.skipped else "interrupted by SIGTERM"
           if outcome.interrupted else f"exit {outcome.returncode}")
    print(f"{run.run_id}: {how} (log {outcome.log})")
    return outcome.returncode or int(outcome.interrupted)


def _default_baseline(runs: list[Run]) -> str:
    labels = list(dict.fromkeys(run.method.split(" ")[0] for run in runs))
    return "grpo" if "grpo" in labels else labels[0]


def _sweep(args: argparse.Namespace, argv: list[str], python: str) -> int:
    missing = [f"--{name}" for name in ("config", "losses", "seeds", "out")
               if getattr(args, name) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: a sweep needs --config, --losses, "
                         "--seeds and --out (or --report OUT / --run RUN_DIR)")
    out = Path(args.out)
    sets = [parse_assignment(item, "--set") for item in args.set]
    runs = plan_runs(args.config, args.losses, args.seeds, sets, parse_grid(args.grid), out)
    baseline = args.baseline or _default_baseline(runs)
    if baseline not in {run.method.split(" ")[0] for run in runs}:
        raise ValueError(f"--baseline {baseline!r}: not one of the sweep's losses")
    if args.dry_run:
        for run in runs:
            print(shlex.join(command(run, last_checkpoint(Path(run.run_dir)))))
        return 0
    write_sweep(out, {"command": shlex.join(["python", "-m", "dgpo", "sweep", *argv]),
                      "out": str(out.resolve()), "config": args.config, "losses": args.losses,
                      "seeds": args.seeds, "set": args.set, "grid": args.grid,
                      "baseline": baseline, "ci": args.ci, "level": args.level})
    for run in runs:
        write_run(run)
    if args.slurm:
        pending = [run for run in runs if read_status(Path(run.run_dir))["state"] != "finished"]
        options = SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus,
                               args.slurm_cpus, args.slurm_mem, args.parallel,
                               tuple(args.slurm_setup), tuple(args.slurm_option))
        array, report = write_scripts(pending, out, options, python)
        print(f"wrote {array} ({len(pending)} array tasks) and {report}")
        if not args.slurm_no_submit:
            array_id, report_id = submit(array, report)
            print(f"submitted job array {array_id}; report job {report_id} runs after it")
        return 0
    outcomes = run_local(runs, args.parallel or 1, python)
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        how = "interrupted by SIGTERM" if outcome.interrupted else f"exit {outcome.returncode}"
        print(f"FAILED: {outcome.run.run_id} {how}, log {outcome.log}", file=sys.stderr)
    paths = write_report(out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if failed else 0


def main(argv: list[str] | None = None, python: str = sys.executable) -> int:
    """Run ``dgpo sweep`` with ``argv`` (the arguments after ``sweep``); returns the exit code.

    Args:
        argv: the arguments after ``sweep`` (``None``: ``sys.argv[2:]``).
        python: the interpreter that runs each ``-m dgpo fit`` (and the SLURM tasks).

    Raises:
        ValueError: for invalid settings (the message names the option and what it allows).
    """
    argv = sys.argv[2:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.run is not None:
        return _run_single(Path(args.run), python)
    if args.report is not None:
        paths = write_report(Path(args.report), args.baseline)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    return _sweep(args, argv, python)
