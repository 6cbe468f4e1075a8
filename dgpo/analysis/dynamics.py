"""Training dynamics of several runs (the paper's Figure 3 kind), read from their ``metrics.csv``.

Panels: reward, Avg@k, entropy, response length and the clip-region fractions LN and HP, per
epoch (one epoch is one rollout). Avg@k is the validation benchmarks' ``val/<benchmark>/avg@k``
(their mean over benchmarks) when the runs validated, else the training rollouts' accuracy
(Avg@n over the training prompts, n samples each).

Run as a script::

    python -m dgpo.analysis.dynamics runs/figures/grpo runs/figures/dgpo --out figure3.png
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dgpo.analysis.load import load_metrics, run_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: (title, alternatives): each alternative is a column name or an ``fnmatch`` pattern; the first
#: alternative that matches any column is drawn (several matching columns are averaged).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("rollout/reward_mean",)),
    ("Avg@k", ("val/mean/avg@*", "val/*/avg@*", "rollout/reward/accuracy")),
    ("entropy", ("train/entropy",)),
    ("response length", ("rollout/response_length_mean",)),
    ("LN fraction (r < 1-eps_l, A < 0)", ("train/region/LN",)),
    ("HP fraction (r > 1+eps_h, A > 0)", ("train/region/HP",)),
)


def metric_series(metrics: pd.DataFrame, alternatives: Sequence[str]) -> tuple[str, pd.Series]:
    """The first alternative present in ``metrics`` as one series (mean of matching columns).

    Returns:
        The matched pattern (``""`` if none) and the series (empty if none).
    """
    for pattern in alternatives:
        columns = [c for c in metrics.columns if fnmatch.fnmatchcase(c.lower(), pattern.lower())]
        if columns:
            return pattern, metrics[columns].mean(axis=1).dropna()
    return "", pd.Series(dtype=float)


def plot_dynamics(runs: Sequence[str | Path], labels: Sequence[str] | None = None,
                  panels: Sequence[tuple[str, Sequence[str]]] = PANELS,
                  ncols: int = 3) -> Figure:
    """Draw each panel's metric against the epoch, one line per run.

    Args:
        runs: run folders (holding ``metrics.csv``).
        labels: one display name per run; defaults to each run's loss (:func:`run_label`).
        panels: ``(title, alternatives)`` pairs (see :data:`PANELS`).
        ncols: panels per row.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: when ``labels`` and ``runs`` differ in length, or there are no runs.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not runs:
        raise ValueError("plot_dynamics needs at least one run folder")
    labels = [run_label(run) for run in runs] if labels is None else list(labels)
    if len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    frames = [load_metrics(run) for run in runs]
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows),
                             layout="constrained", squeeze=False)
    for ax, (title, alternatives) in zip(axes.flat, panels, strict=False):
        used = ""
        for index, (label, frame) in enumerate(zip(labels, frames, strict=True)):
            pattern, series = metric_series(frame, alternatives)
            if series.empty:
                continue
            used = used or pattern
            ax.plot(series.index, series.to_numpy(), marker="o", ms=3, color=f"C{index}",
                    label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (rollout)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
        if used:
            ax.set_ylabel(used, fontsize=8)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training dynamics")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: draw the training dynamics of runs into one PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.csv")
    parser.add_argument("--out", default="figure3.png", help="output image (PNG)")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_dynamics(args.runs, args.labels)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
