"""The three panels of Figure 4, drawn from :class:`~dgpo.analysis.method_tokens.MethodTokens`.

Weights are drawn on a log axis; a weight of exactly 0 (GRPO past the boundaries) is drawn at a
floor one decade below the smallest positive weight, labelled "0".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from dgpo.analysis.method_tokens import MethodTokens
from dgpo.analysis.weights import WEIGHT_LABELS, weight_curve
from dgpo.losses import LOSSES, REGION_NAMES, build_loss

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

OUTSIDE_MARKER = "^"
#: Advantage colours: blue negative, red positive, yellow near 0 (visible on white).
ADVANTAGE_CMAP = "RdYlBu_r"
INSIDE_MARKER = "o"


def zero_floor(panels: dict[str, MethodTokens]) -> float:
    """Where a zero weight is drawn: one decade below the smallest positive weight."""
    smallest = math.inf
    for panel in panels.values():
        positive = panel.weight[np.isfinite(panel.weight) & (panel.weight > 0)]
        if positive.size:
            smallest = min(smallest, float(positive.min()))
    return 10.0 ** (math.floor(math.log10(smallest)) - 1) if math.isfinite(smallest) else 1e-3


def _on_log_axis(weight: np.ndarray, floor: float) -> np.ndarray:
    return np.where(weight > 0, weight, floor)


def _mark_zero(ax: Axes, floor: float, axis: str = "y") -> None:
    """Put decade ticks on a log weight axis starting at ``floor``, which is labelled "0"."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, NullLocator

    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    decades = max(int(math.ceil(math.log10(max(high, floor * 10) / floor))), 1)
    step = max(1, math.ceil(decades / 8))
    target.set_major_locator(FixedLocator([floor * 10.0**k for k in range(0, decades + 1, step)]))
    target.set_minor_locator(NullLocator())
    base = LogFormatterSciNotation()
    base.set_axis(target)

    def label(value: float, position: int | None = None) -> str:
        return "0" if math.isclose(value, floor, rel_tol=1e-6) else base(value, position)

    target.set_major_formatter(FuncFormatter(label))
    line = ax.axhline if axis == "y" else ax.axvline
    line(floor * 2.2, color="lightgrey", lw=0.6, zorder=0)
    if axis == "y":
        ax.set_ylim(low, high)
    else:
        ax.set_xlim(low, high)


def _new_figure(fig: Figure | SubFigure | None, size: tuple[float, float]) -> Figure | SubFigure:
    if fig is not None:
        return fig
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size, layout="constrained")


def _log_bins(values: list[np.ndarray], count: int = 60) -> np.ndarray:
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in values] or [np.ones(1)])
    low, high = np.log10(finite.min()), np.log10(finite.max())
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    return np.logspace(low, high, count)


def plot_distributions(panels: dict[str, MethodTokens],
                       fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """(a) Overall distributions: the weight, π and the IS ratio of the tokens, per method."""
    fig = _new_figure(fig, (15, 4.2))
    axes = fig.subplots(1, 3)
    floor = zero_floor(panels)
    first = next(iter(panels.values()))
    weights = [_on_log_axis(p.weight[np.isfinite(p.weight)], floor) for p in panels.values()]
    bins = {"weight": _log_bins(weights + [np.full(1, floor)]),
            "prob": _log_bins([p.tokens["prob"].to_numpy() for p in panels.values()]),
            "ratio": _log_bins([p.tokens["ratio"].to_numpy() for p in panels.values()])}
    for index, (panel, weight) in enumerate(zip(panels.values(), weights, strict=True)):
        colour = f"C{index}"
        share = 1.0 / max(len(weight), 1)
        zero = float((weight <= floor).mean()) if weight.size else 0.0
        axes[0].hist(weight, bins=bins["weight"], weights=np.full(len(weight), share),
                     histtype="step", lw=1.6, color=colour, label=f"{panel.label}: {zero:.1%} zero")
        for ax, column in ((axes[1], "prob"), (axes[2], "ratio")):
            values = panel.tokens[column].to_numpy()
            ax.hist(values, bins=bins[column], histtype="step", lw=1.6, color=colour,
                    weights=np.full(len(values), 1 / max(len(values), 1)), label=panel.label)
    axes[0].set_xlabel(WEIGHT_LABELS[first.kind])
    axes[1].set_xlabel(r"probability $\pi_\theta$")
    axes[2].set_xlabel(r"IS ratio $r = \pi_\theta/\pi_{old}$")
    for edge in _edges(first):
        axes[2].axvline(edge, color="grey", ls=":")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("fraction of tokens")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.2)
    _mark_zero(axes[0], floor, axis="x")
    fig.suptitle("(a) Overall distribution of gradient weights and probabilities")
    return fig


def _edges(panel: MethodTokens) -> list[float]:
    """The trust-region boundaries of the IS ratio: 1−ε_l (if any) and 1+ε_h."""
    low = [] if panel.clip_low is None else [1.0 - panel.clip_low]
    return [*low, 1.0 + panel.clip_high]


def _analytic(panel: MethodTokens, ax: Axes, ratios: np.ndarray) -> None:
    """Overlay the method's weight as a function of r (exact for ``kind="relative"``)."""
    if panel.kind != "relative" or panel.method not in LOSSES:
        return
    loss = build_loss(panel.method, **panel.hparams)
    for advantage, colour in ((-1.0, "navy"), (1.0, "darkred")):
        curve = weight_curve(loss, ratios, 1.0, advantage, kind="relative")
        ax.plot(ratios, np.where(curve > 0, curve, np.nan), color=colour, lw=0.8, ls="--",
                alpha=0.45, zorder=1)


def plot_scatter_grid(panels: dict[str, MethodTokens], max_points: int = 20_000, seed: int = 0,
                      fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """(b) The weight against the IS ratio (top row) and π (bottom row), one column per method.

    Points are coloured by advantage (blue negative, red positive, yellow near zero); tokens
    outside the trust region are triangles. The top row marks the boundaries ``1−ε_l`` and
    ``1+ε_h`` and, for ``kind="relative"``, the method's weight as a function of r for A < 0 and
    A > 0 (dashed, under the points).
    """
    import matplotlib.colors as mcolors

    fig = _new_figure(fig, (5 * len(panels), 9))
    axes = np.atleast_2d(fig.subplots(2, len(panels), sharey=True, squeeze=False))
    floor = zero_floor(panels)
    advantages = np.concatenate([p.tokens["advantage"].to_numpy() for p in panels.values()])
    bound = max(float(np.abs(advantages).max()) if advantages.size else 1.0, 1e-6)
    norm = mcolors.TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    rng = np.random.default_rng(seed)
    mappable: Any = None
    for column, panel in enumerate(panels.values()):
        tokens = panel.tokens
        keep = np.flatnonzero(np.isfinite(panel.weight))
        if keep.size > max_points:
            keep = np.sort(rng.choice(keep, size=max_points, replace=False))
        weight = _on_log_axis(panel.weight[keep], floor)
        outside = (tokens["region"].astype(str).to_numpy()[keep] != "IN")
        advantage = tokens["advantage"].to_numpy()[keep]
        for row, x_name in enumerate(("ratio", "prob")):
            ax = axes[row, column]
            x = tokens[x_name].to_numpy()[keep]
            for mask, marker, size in ((~outside, INSIDE_MARKER, 8), (outside, OUTSIDE_MARKER, 22)):
                mappable = ax.scatter(x[mask], weight[mask], c=advantage[mask], cmap=ADVANTAGE_CMAP,
                                      norm=norm, s=size, marker=marker, alpha=0.7, linewidths=0,
                                      zorder=2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.2)
            if panel.kind == "relative":
                ax.axhline(1.0, color="black", lw=0.8, ls="-.", zorder=1)
            if row == 0:
                for edge in _edges(panel):
                    ax.axvline(edge, color="grey", ls=":", lw=1.2)
                low, high = ax.get_xlim()
                _analytic(panel, ax, np.logspace(np.log10(low), np.log10(high), 400))
                ax.set_xlim(low, high)
                ax.set_title(f"{panel.label} ({outside.mean():.1%} outside the trust region)",
                             fontsize=10)
                ax.set_xlabel(r"IS ratio $r$")
            else:
                ax.set_xlabel(r"probability $\pi_\theta$")
            if column == 0:
                ax.set_ylabel(WEIGHT_LABELS[panel.kind])
    for ax in axes[:, 0]:  # after every column is drawn: the y axis is shared
        _mark_zero(ax, floor)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, label="advantage", shrink=0.6, pad=0.01)
    fig.suptitle("(b) Gradient weight vs. IS ratio (top) and probability (bottom); "
                 f"{INSIDE_MARKER} inside, {OUTSIDE_MARKER} outside the trust region")
    return fig


def plot_boundary_distribution(panels: dict[str, MethodTokens],
                               fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """(c) Boundary distribution: each region's share of tokens and the weights they received.

    Left: the share of tokens per region and method (log scale). Right: box plots of the weights
    per region and method (box: quartiles, whiskers: 5th–95th percentile, dot: mean).
    """
    fig = _new_figure(fig, (15, 4.8))
    shares, boxes = fig.subplots(1, 2, width_ratios=[1.0, 1.5])
    floor = zero_floor(panels)
    count = len(panels)
    width = 0.8 / max(count, 1)
    for index, panel in enumerate(panels.values()):
        region = panel.tokens["region"].astype(str).to_numpy()
        offsets = np.arange(len(REGION_NAMES)) + (index - (count - 1) / 2) * width
        share = np.array([(region == name).mean() for name in REGION_NAMES]) * 100
        bars = shares.bar(offsets, np.maximum(share, 1e-3), width, color=f"C{index}",
                          label=panel.label)
        shares.bar_label(bars, labels=[f"{s:.1f}" if s >= 0.05 else ("0" if s == 0 else "<.1")
                                       for s in share], fontsize=7, padding=1)
        data, positions = [], []
        for slot, name in enumerate(REGION_NAMES):
            weight = panel.weight[(region == name) & np.isfinite(panel.weight)]
            if weight.size:
                data.append(_on_log_axis(weight, floor))
                positions.append(offsets[slot])
        if data:
            plot = boxes.boxplot(data, positions=positions, widths=width * 0.85,
                                 whis=(5, 95), showfliers=False, patch_artist=True,
                                 medianprops={"color": "black"})
            for patch in plot["boxes"]:
                patch.set_facecolor(f"C{index}")
                patch.set_alpha(0.55)
            boxes.scatter(positions, [d.mean() for d in data], color=f"C{index}", marker="o",
                          s=14, zorder=3, edgecolors="black", linewidths=0.5)
    for ax in (shares, boxes):
        ax.set_xticks(np.arange(len(REGION_NAMES)), REGION_NAMES)
        ax.set_yscale("log")
        ax.grid(alpha=0.2, axis="y")
    shares.set_ylabel("share of tokens (%)")
    shares.set_ylim(bottom=1e-2)
    shares.legend(fontsize=8)
    first = next(iter(panels.values()))
    boxes.set_ylabel(WEIGHT_LABELS[first.kind])
    if first.kind == "relative":
        boxes.axhline(1.0, color="black", lw=0.8, ls="-.")
    _mark_zero(boxes, floor)
    fig.suptitle("(c) Boundary distribution: tokens per region and the weights they received "
                 "(IN inside; LN/HP past the clipped boundaries; LP/HN lagging)")
    return fig
