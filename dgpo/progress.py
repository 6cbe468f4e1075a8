"""One line per training epoch on the console: reward, accuracy, length, entropy, time per phase."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dgpo.console import RunLog

SUMMARY_METRICS = (
    ("reward", "rollout/reward_mean", "{:.3f}"),
    ("accuracy", "rollout/reward/accuracy", "{:.3f}"),
    ("length", "rollout/response_length_mean", "{:.1f}"),
    ("entropy", "train/entropy", "{:.3f}"),
)
"""(label, metric name, format) of the values of a summary line, in order."""

TIME_PREFIX, TIME_SUFFIX = "time/", "_seconds"


def summary_line(epoch: int, metrics: Mapping[str, Any]) -> str:
    """The summary of one epoch from its logged metrics; absent metrics are left out.

    Example:
        >>> summary_line(3, {"rollout/reward_mean": 0.5, "train/entropy": 1.25,
        ...                  "time/generation_seconds": 6.31, "time/train_seconds": 2.0})
        'epoch 3: reward 0.500, entropy 1.250 | generation 6.3s, train 2.0s'

    """
    values = [f"{label} {fmt.format(float(metrics[name]))}"
              for label, name, fmt in SUMMARY_METRICS if name in metrics]
    times = [f"{name[len(TIME_PREFIX):-len(TIME_SUFFIX)]} {float(value):.1f}s"
             for name, value in metrics.items()
             if name.startswith(TIME_PREFIX) and name.endswith(TIME_SUFFIX)]
    line = f"epoch {epoch}: " + ", ".join(values)
    return line + (" | " + ", ".join(times) if times else "")


class EpochSummary(Callback):
    """Print :func:`summary_line` after every training epoch (global rank 0 only).

    The line of epoch N is printed once all of its metrics are logged, including those the
    module logs in its own ``on_train_epoch_end`` (which runs after the callbacks' hook): at the
    start of epoch N + 1, before any other callback (``dgpo.cli`` puts this one first), or at the
    end of training. It is printed through the progress bar when there is one, so that it does
    not break the bar.

    Args:
        run_log: the quiet console's log (:func:`dgpo.console.quiet_console`); its file is opened
            in the run folder at setup, and its path printed. None (verbose): no log file.

    """

    def __init__(self, run_log: RunLog | None = None) -> None:
        self.run_log = run_log
        self._ended_epoch: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Open the run's log file in ``trainer.log_dir`` (quiet console only)."""
        if self.run_log is None:
            return
        folder = trainer.log_dir or trainer.default_root_dir
        path = self.run_log.open(folder, trainer.global_rank, trainer.world_size)
        self._print(trainer, f"full log: {path}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Close the run's log file; later records wait in memory for the next run's."""
        if self.run_log is not None:
            self.run_log.close_file()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Note that an epoch ended; its line waits for the module's epoch-end metrics."""
        self._ended_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the previous epoch's line, before this epoch logs anything."""
        self._flush(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the last epoch's line."""
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        if self._ended_epoch is not None:
            self._print(trainer, summary_line(self._ended_epoch, trainer.callback_metrics))
            self._ended_epoch = None

    @staticmethod
    def _print(trainer: Trainer, line: str) -> None:
        if not trainer.is_global_zero:
            return
        bar = trainer.progress_bar_callback
        if bar is not None:
            bar.print(line)
        else:
            print(line, flush=True)
