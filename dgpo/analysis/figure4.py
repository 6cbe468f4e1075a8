r"""Figure 4 of the paper: the gradient weights real training tokens received, per method.

Panels: (a) the overall distributions of the weight, π and the IS ratio; (b) scatter plots of the
weight against the IS ratio (top) and π (bottom) for GRPO, GPPO and DGPO, coloured by advantage;
(c) the boundary distribution: each region's share of tokens and the weights they received.

Each method's panel shows the tokens of the run trained with that method and the weight it
applied (``prob_weight``). A method without its own run is shown on the first run's tokens with
the weight it would have applied (the recorder's ``w_<method>`` column), and says so.

Run as a script::

    python -m dgpo.analysis.figure4 runs/figure4/grpo runs/figure4/gppo runs/figure4/dgpo \\
        --out figure4.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dgpo.analysis.figure4_plots import (
    plot_boundary_distribution,
    plot_distributions,
    plot_scatter_grid,
)
from dgpo.analysis.load import RecordedRun, load_runs
from dgpo.analysis.method_tokens import MethodTokens
from dgpo.analysis.weights import METHOD_LABELS, WEIGHT_KINDS, WeightKind, check_kind
from dgpo.losses import REGION_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The methods of the paper's Figure 4.
FIGURE4_METHODS: tuple[str, ...] = ("grpo", "gppo", "dgpo")


def method_tokens(runs: Sequence[RecordedRun], methods: Sequence[str] = FIGURE4_METHODS,
                  kind: WeightKind = "relative") -> dict[str, MethodTokens]:
    """Pick each method's tokens and weights from recorded runs (see the module docstring).

    Args:
        runs: recorded runs, e.g. one per method.
        methods: the methods to show, in order.
        kind: how to express the weights.

    Raises:
        ValueError: for no runs or an unknown kind.
        KeyError: for a method that has neither a run nor recorded weights.
    """
    if not runs:
        raise ValueError("method_tokens needs at least one recorded run")
    check_kind(kind)
    trained: dict[str, RecordedRun] = {}
    for run in runs:
        trained.setdefault(run.method, run)
    out: dict[str, MethodTokens] = {}
    for name in methods:
        own = trained.get(name)
        run = own if own is not None else runs[0]
        label = METHOD_LABELS.get(name, name)
        if own is None:
            label += f" (on {run.label}'s tokens)"
        described = run.meta.get("loss") if own is not None else None
        described = described or run.meta.get("methods", {}).get(name, {})
        out[name] = MethodTokens(
            method=name, label=label, tokens=run.tokens,
            weight=run.weights(None if own is not None else name, kind), kind=kind,
            counterfactual=own is None, clip_low=run.meta.get("clip_low"),
            clip_high=float(run.meta.get("clip_high", 0.2)),
            hparams=_loss_hparams(described.get("init_args", {})))
    return out


def _loss_hparams(init_args: dict[str, Any]) -> dict[str, Any]:
    """The recorded hyper-parameters that shape a weight (aggregation settings left out)."""
    return {k: v for k, v in init_args.items() if k not in ("agg", "norm_length")}


def region_summary(panels: dict[str, MethodTokens]) -> pd.DataFrame:
    """Per method and region: token count and share, and the weights the tokens received.

    Returns:
        One row per (method, region) with ``tokens``, ``share`` (of the method's tokens),
        ``zero_share`` (of the region's tokens with weight 0) and the weight's ``mean``,
        ``median``, ``min`` and ``max`` (NaN for an empty region).
    """
    rows: list[dict[str, Any]] = []
    for panel in panels.values():
        region = panel.tokens["region"].astype(str).to_numpy()
        total = max(len(region), 1)
        for name in REGION_NAMES:
            weight = panel.weight[region == name]
            weight = weight[np.isfinite(weight)]
            rows.append({
                "method": panel.label, "region": name, "tokens": int((region == name).sum()),
                "share": float((region == name).sum()) / total,
                "zero_share": float((weight == 0).mean()) if weight.size else np.nan,
                "mean": float(weight.mean()) if weight.size else np.nan,
                "median": float(np.median(weight)) if weight.size else np.nan,
                "min": float(weight.min()) if weight.size else np.nan,
                "max": float(weight.max()) if weight.size else np.nan,
            })
    return pd.DataFrame(rows).set_index(["method", "region"])


def plot_figure4(runs: Sequence[RecordedRun], methods: Sequence[str] = FIGURE4_METHODS,
                 kind: WeightKind = "relative", max_points: int = 20_000) -> Figure:
    """All of Figure 4 in one figure: (a) on top, (b) in the middle, (c) at the bottom.

    Args:
        runs: recorded runs (see :func:`method_tokens`).
        methods: the methods to compare.
        kind: how to express the weights.
        max_points: the most points drawn per scatter plot (a random subset).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    panels = method_tokens(runs, methods, kind)
    fig = plt.figure(figsize=(5.0 * max(len(panels), 3), 19), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.0, 2.1, 1.25])
    plot_distributions(panels, fig=top)
    plot_scatter_grid(panels, max_points=max_points, fig=middle)
    plot_boundary_distribution(panels, fig=bottom)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: draw Figure 4 from recorded runs into one PNG and print the region table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding gradient_weights.parquet")
    parser.add_argument("--out", default="figure4.png", help="output image (PNG)")
    parser.add_argument("--methods", nargs="+", default=list(FIGURE4_METHODS))
    parser.add_argument("--kind", default="relative", choices=list(WEIGHT_KINDS))
    parser.add_argument("--max-points", type=int, default=20_000)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    runs = load_runs(args.runs)
    fig = plot_figure4(runs, args.methods, args.kind, args.max_points)
    fig.savefig(args.out, dpi=110)
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(region_summary(method_tokens(runs, args.methods, args.kind)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
