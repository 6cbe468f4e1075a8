"""Figure 2 of the paper: each method's gradient weight W against π, computed from ``prob_weight``.

Run as a script::

    python -m dgpo.analysis.figure2 --out figure2.png --old-prob 0.5
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dgpo.analysis.weights import (
    METHOD_LABELS,
    WeightKind,
    check_kind,
    check_token_level,
    weight_curve,
)
from dgpo.losses import DGPOLoss, build_loss

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The baselines drawn by default (PG is the reference line). GSPO and GMPO have no curve: their
#: weight depends on the whole response (see :data:`dgpo.analysis.weights.TOKEN_LEVEL_METHODS`).
BASELINES: tuple[str, ...] = ("grpo", "cispo", "gppo", "ce_gppo", "aspo", "sapo")
#: The DGPO settings drawn by default: (n, m). n shapes the left half, m the right half.
DGPO_SETTINGS: tuple[tuple[float, float], ...] = ((1, 2), (2, 3))


def weight_functions(old_prob: float = 0.5, methods: Sequence[str] = BASELINES,
                     dgpo_settings: Sequence[tuple[float, float]] = DGPO_SETTINGS,
                     clip_low: float = 0.2, clip_high: float = 0.2, kind: WeightKind = "prob",
                     num: int = 801) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """The curves of Figure 2: W against π for each method and advantage sign.

    Args:
        old_prob: π_old of the token, in (0, 1).
        methods: built-in methods besides DGPO (each with its defaults and the given widths).
        dgpo_settings: the ``(n, m)`` of each DGPO curve.
        clip_low: ε_l of every method.
        clip_high: ε_h of every method.
        kind: how the weight is expressed (see :mod:`dgpo.analysis.weights`).
        num: grid points along π.

    Returns:
        The grid of π, and per curve label ``{"negative": W(A<0), "positive": W(A>0)}``.

    Raises:
        ValueError: for π_old outside (0, 1), an unknown or sequence-level method, or an
            unknown weight kind.
    """
    if not 0.0 < old_prob < 1.0:
        raise ValueError(f"old_prob must be in (0, 1), got {old_prob!r}")
    check_kind(kind)
    check_token_level(methods)
    widths = {"clip_low": clip_low, "clip_high": clip_high}
    grid = np.linspace(1.0 / num, 1.0, num)
    # Put the boundaries on the grid so that jumps and kinks are drawn where they are.
    edges = [(1.0 - clip_low) * old_prob, (1.0 + clip_high) * old_prob]
    grid = np.unique(np.concatenate([grid, [e for e in edges if e < 1.0]]))
    losses = {METHOD_LABELS[name]: build_loss(name, **widths) for name in methods}
    for n, m in dgpo_settings:
        losses[f"DGPO (n={n:g}, m={m:g})"] = DGPOLoss(n=n, m=m, **widths)
    curves: dict[str, dict[str, np.ndarray]] = {}
    for label, loss in losses.items():
        curves[label] = {sign: weight_curve(loss, grid, old_prob, value, kind)
                         for sign, value in (("negative", -1.0), ("positive", 1.0))}
    return grid, curves


def plot_weight_functions(old_prob: float = 0.5, methods: Sequence[str] = BASELINES,
                          dgpo_settings: Sequence[tuple[float, float]] = DGPO_SETTINGS,
                          clip_low: float = 0.2, clip_high: float = 0.2,
                          kind: WeightKind = "prob", ymax: float | None = None) -> Figure:
    """Draw Figure 2: negative advantages on the left (π from 1 to 0), positive on the right.

    The PG line (``1/π_old``, or 1 for ``kind="relative"``) is dashed; the boundaries
    ``(1−ε_l)π_old`` and ``(1+ε_h)π_old`` are dotted verticals on both halves.

    Args:
        old_prob: π_old, in (0, 1).
        methods: built-in baselines to draw besides DGPO.
        dgpo_settings: ``(n, m)`` of each DGPO curve.
        clip_low: ε_l.
        clip_high: ε_h.
        kind: how the weight is expressed (default W on ∇π, as in the paper).
        ymax: top of the y axis; defaults to 3× the PG weight.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    grid, curves = weight_functions(old_prob, methods, dgpo_settings, clip_low, clip_high, kind)
    pg = {"prob": 1.0 / old_prob, "relative": 1.0, "logprob": None}[kind]
    top = ymax if ymax is not None else 3.0 * (pg if pg is not None else 1.0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True,
                                      gridspec_kw={"wspace": 0.04})
    colours = plt.get_cmap("tab10").colors
    for index, (label, values) in enumerate(curves.items()):
        is_dgpo = label.startswith("DGPO")
        style = {"color": colours[index % len(colours)], "lw": 2.4 if is_dgpo else 1.4,
                 "ls": "-" if is_dgpo else (0, (4, 1.5)) if index % 2 else "-",
                 "alpha": 1.0 if is_dgpo else 0.85, "zorder": 3 if is_dgpo else 2}
        left.plot(grid, np.clip(values["negative"], None, top * 1.05), label=label, **style)
        right.plot(grid, np.clip(values["positive"], None, top * 1.05), **style)
    boundaries = {r"$(1-\epsilon_l)\pi_{old}$": (1 - clip_low) * old_prob,
                  r"$(1+\epsilon_h)\pi_{old}$": (1 + clip_high) * old_prob}
    for ax, title in ((left, r"$A < 0$"), (right, r"$A > 0$")):
        if pg is not None:
            ax.axhline(pg, color="black", ls="--", lw=1.0, zorder=1)
        for name, x in boundaries.items():
            if x < 1.0:
                ax.axvline(x, color="grey", ls=":", lw=1.2, zorder=1)
                ax.text(x, top * 0.97, name, rotation=90, ha="right", va="top", fontsize=8,
                        color="dimgrey")
        ax.set_title(title)
        ax.set_xlabel(r"$\pi_\theta$")
        ax.set_ylim(-0.03 * top, top)
        ax.grid(alpha=0.25)
    left.set_xlim(1.0, 0.0)
    right.set_xlim(0.0, 1.0)
    left.set_xticks([1.0, 0.8, 0.6, 0.4, 0.2])  # 0 is shared by both halves: label it once
    if pg is not None:
        left.text(0.98, pg, r" PG: $1/\pi_{old}$" if kind == "prob" else " PG", va="bottom",
                  fontsize=8)
    left.set_ylabel({"prob": r"weight $W$ on $\nabla_\theta\pi_\theta$",
                     "relative": r"$W\cdot\pi_{old}$", "logprob": r"$g = W\cdot\pi$"}[kind])
    fig.legend(loc="upper center", ncol=min(len(curves), 7), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.02))
    fig.suptitle(rf"Gradient weight against $\pi$ ($\pi_{{old}}$ = {old_prob:g}, "
                 rf"$\epsilon_l$ = {clip_low:g}, $\epsilon_h$ = {clip_high:g})", y=1.08,
                 fontsize=11)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: draw Figure 2 into a PNG file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figure2.png", help="output image (PNG)")
    parser.add_argument("--old-prob", type=float, default=0.5, help="pi_old of the token")
    parser.add_argument("--clip-low", type=float, default=0.2)
    parser.add_argument("--clip-high", type=float, default=0.2)
    parser.add_argument("--kind", default="prob", choices=["prob", "relative", "logprob"])
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_weight_functions(args.old_prob, clip_low=args.clip_low, clip_high=args.clip_high,
                                kind=args.kind)
    fig.savefig(args.out, dpi=150, bbox_inches="tight")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
