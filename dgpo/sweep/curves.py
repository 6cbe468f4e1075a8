"""``curves.png``: per-epoch curves, per method the mean across seeds with a shaded band."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dgpo.sweep.collect import CURVES
from dgpo.sweep.stats import CIMethod, mean_ci


def band(curves: pd.DataFrame, method: str, column: str, level: float = 0.95,
         ci: CIMethod = "t") -> pd.DataFrame:
    """One method's curve: per epoch the mean across seeds and its interval (``low``, ``high``).

    Epochs where a single seed logged the column have no interval (NaN).
    """
    rows = []
    part = curves[curves["method"] == method].dropna(subset=[column])
    for epoch, group in part.groupby("epoch"):
        est = mean_ci(group[column].to_numpy(), level, ci)
        rows.append({"epoch": epoch, "mean": est.mean, "low": est.low, "high": est.high,
                     "seeds": est.n})
    return pd.DataFrame(rows, columns=["epoch", "mean", "low", "high", "seeds"])


def plot_curves(curves: pd.DataFrame, path: Path, level: float = 0.95,
                ci: CIMethod = "t") -> Path:
    """Draw every ``CURVES`` panel (one line per method) and save the figure at ``path``."""
    fig = Figure(figsize=(13, 7), layout="constrained")  # no pyplot: the backend stays the user's
    axes = fig.subplots(2, 3)
    methods = list(dict.fromkeys(curves["method"])) if "method" in curves else []
    colours = matplotlib.colormaps["tab10"]
    for ax, (column, title) in zip(axes.flat, CURVES, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if column not in curves:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        for i, method in enumerate(methods):
            line = band(curves, method, column, level, ci)
            if line.empty:
                continue
            colour = colours(i % 10)
            ax.plot(line["epoch"], line["mean"], color=colour,
                    label=f"{method} (n={int(line['seeds'].max())})")
            has_band = ~np.isnan(line["low"].to_numpy(dtype=float))
            ax.fill_between(line["epoch"][has_band], line["low"][has_band],
                            line["high"][has_band], color=colour, alpha=0.2, linewidth=0)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5))
    fig.suptitle(f"mean across seeds, shaded: {level:.0%} CI")
    fig.savefig(path, dpi=120)
    return path
