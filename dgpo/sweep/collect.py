"""Collecting the finished runs' metrics: per-epoch curves and one number per run and metric.

The names are those dgpo logs into ``metrics.csv`` (CSVLogger): ``rollout/reward_mean``,
``rollout/reward/accuracy``, ``train/entropy``, ``rollout/response_length_mean``,
``train/region/LN``, ``train/region/HP`` and ``val/<benchmark>/<avg@k|pass@k|maj@k>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from dgpo.sweep.execute import METRICS_FILE, read_status
from dgpo.sweep.plan import Run

#: How many final epochs the "final" metrics average over.
LAST_EPOCHS = 3

REWARD = "rollout/reward_mean"
ACCURACY = "rollout/reward/accuracy"
ENTROPY = "train/entropy"
LENGTH = "rollout/response_length_mean"
LN = "train/region/LN"
HP = "train/region/HP"

#: The per-epoch curves of ``curves.png``: (column, panel title).
CURVES = ((REWARD, "reward"), (ACCURACY, "accuracy"), (ENTROPY, "entropy"),
          (LENGTH, "response length"), (LN, "LN fraction"), (HP, "HP fraction"))

#: The metrics of ``summary.csv`` in order, with how each is computed (the report lists this).
METRIC_DEFINITIONS = {
    "final_reward": f"mean `{REWARD}` over the last {LAST_EPOCHS} epochs",
    "final_accuracy": f"mean `{ACCURACY}` over the last {LAST_EPOCHS} epochs",
    "best_epoch": f"epoch of the highest `{REWARD}` (first if tied)",
    "reward_auc": f"area under the `{REWARD}` curve divided by the number of epochs "
                  "(the mean reward over all epochs)",
    "final_entropy": f"mean `{ENTROPY}` over the last {LAST_EPOCHS} epochs",
    "response_length": f"mean `{LENGTH}` over the last {LAST_EPOCHS} epochs",
    "ln_fraction": f"mean `{LN}` (tokens in the LN region) over all epochs",
    "hp_fraction": f"mean `{HP}` (tokens in the HP region) over all epochs",
    "wall_seconds": "wall time of the run's `fit`, summed over its attempts (status.json)",
    "val/<benchmark>/<metric>": "the last validation's Avg@k / Pass@k / Maj@k, when logged "
                                "(`val/mean/*` only with several benchmarks)",
}

_VAL = re.compile(r"^val/.+/(avg|pass|maj)@\d+$")


def epoch_table(run_dir: Path) -> pd.DataFrame:
    """One row per epoch of a run's metrics: the last value logged in each column that epoch.

    Reads ``metrics-attempt<k>.csv`` (earlier attempts of a resumed run) and ``metrics.csv`` in
    order, so an epoch logged again after a resume takes the newer value.

    Raises:
        ValueError: when the run folder holds no metrics file or it has no ``epoch`` column.
    """
    attempts = sorted(run_dir.glob("metrics-attempt*.csv"),
                      key=lambda p: int(p.stem.removeprefix("metrics-attempt")))
    files = [*attempts, run_dir / METRICS_FILE]
    frames = [pd.read_csv(path) for path in files if path.is_file()]
    if not frames:
        raise ValueError(f"{run_dir}: no {METRICS_FILE}; the run has not logged anything")
    data = pd.concat(frames, ignore_index=True)
    if "epoch" not in data.columns:
        raise ValueError(f"{run_dir / METRICS_FILE}: no 'epoch' column; columns: {list(data)}")
    data = data.dropna(subset=["epoch"]).astype({"epoch": int})
    return data.groupby("epoch").last().sort_index()


def _tail_mean(series: pd.Series) -> float:
    values = series.dropna()
    return float(values.iloc[-LAST_EPOCHS:].mean()) if len(values) else float("nan")


def _all_mean(series: pd.Series) -> float:
    values = series.dropna()
    return float(values.mean()) if len(values) else float("nan")


def run_metrics(table: pd.DataFrame, wall_seconds: float | None) -> dict[str, float]:
    """One number per metric of ``METRIC_DEFINITIONS`` for one run (NaN when not logged)."""
    def column(name: str) -> pd.Series:
        return table[name] if name in table else pd.Series(dtype=float)

    reward = column(REWARD).dropna()
    metrics = {
        "final_reward": _tail_mean(reward),
        "final_accuracy": _tail_mean(column(ACCURACY)),
        "best_epoch": float(reward.idxmax()) if len(reward) else float("nan"),
        "reward_auc": _all_mean(reward),
        "final_entropy": _tail_mean(column(ENTROPY)),
        "response_length": _tail_mean(column(LENGTH)),
        "ln_fraction": _all_mean(column(LN)),
        "hp_fraction": _all_mean(column(HP)),
        "wall_seconds": float("nan") if wall_seconds is None else float(wall_seconds),
    }
    names = sorted(c for c in table.columns if _VAL.match(c))
    benchmarks = {name.split("/")[1] for name in names} - {"mean"}
    if len(benchmarks) == 1:  # the mean over one benchmark repeats it
        names = [name for name in names if not name.startswith("val/mean/")]
    for name in names:
        values = table[name].dropna()
        if len(values):
            metrics[name] = float(values.iloc[-1])
    return metrics


def collect(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The finished runs' numbers.

    Returns:
        ``(scalars, curves)``: ``scalars`` has one row per run and metric (columns ``method``,
        ``seed``, ``run_id``, ``metric``, ``value``); ``curves`` one row per run and epoch
        (``method``, ``seed``, ``epoch`` and the ``CURVES`` columns that were logged).
    """
    scalar_rows, curve_frames = [], []
    for run in runs:
        run_dir = Path(run.run_dir)
        status = read_status(run_dir)
        if status["state"] != "finished":
            continue
        table = epoch_table(run_dir)
        wall = float(status["wall_seconds"]) if "wall_seconds" in status else None
        for metric, value in run_metrics(table, wall).items():
            if not np.isnan(value):
                scalar_rows.append({"method": run.method, "seed": run.seed, "run_id": run.run_id,
                                    "metric": metric, "value": value})
        curves = table[[c for c, _ in CURVES if c in table]].reset_index()
        curve_frames.append(curves.assign(method=run.method, seed=run.seed))
    scalars = pd.DataFrame(scalar_rows, columns=["method", "seed", "run_id", "metric", "value"])
    curves = (pd.concat(curve_frames, ignore_index=True) if curve_frames
              else pd.DataFrame(columns=["method", "seed", "epoch"]))
    return scalars, curves
