"""``python -m dgpo sweep``: a multi-seed comparison of losses with confidence intervals.

Modules, one concern each: :mod:`~dgpo.sweep.plan` (the runs and their ``fit`` commands),
:mod:`~dgpo.sweep.execute` (running, resuming, skipping), :mod:`~dgpo.sweep.slurm` (the job
array), :mod:`~dgpo.sweep.collect` (metrics per run), :mod:`~dgpo.sweep.stats` (intervals,
paired differences), :mod:`~dgpo.sweep.report` and :mod:`~dgpo.sweep.curves` (the outputs), and
:mod:`~dgpo.sweep.cli` (the command line).
"""

from dgpo.sweep.cli import main, write_report

__all__ = ["main", "write_report"]
