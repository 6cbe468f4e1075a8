"""The sweep's tables: ``summary.csv`` and ``report.md`` from the collected per-run numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dgpo.sweep.collect import LAST_EPOCHS, METRIC_DEFINITIONS
from dgpo.sweep.stats import CIMethod, mean_ci, paired_difference, probability_of_improvement

SUMMARY_COLUMNS = ["method", "metric", "seeds", "mean", "std", "ci_low", "ci_high"]
#: The metrics compared with the baseline (higher is better), besides validation Avg@k/Pass@k.
COMPARED = ("final_reward", "final_accuracy", "reward_auc")
_TITLES = {"final_reward": "final reward", "final_accuracy": "final accuracy",
           "best_epoch": "best epoch", "reward_auc": "reward AUC",
           "final_entropy": "final entropy", "response_length": "response length",
           "ln_fraction": "LN", "hp_fraction": "HP", "wall_seconds": "wall time (s)"}


def _ordered(names: list[str], first: list[str]) -> list[str]:
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def _methods(scalars: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(scalars["method"]))


def summary_table(scalars: pd.DataFrame, level: float = 0.95, ci: CIMethod = "t") -> pd.DataFrame:
    """One row per method and metric: seeds (their count), mean, std and confidence interval."""
    rows = []
    metrics = _ordered(list(dict.fromkeys(scalars["metric"])), list(_TITLES))
    for method in _methods(scalars):
        for metric in metrics:
            values = scalars[(scalars["method"] == method) & (scalars["metric"] == metric)]
            if values.empty:
                continue
            est = mean_ci(values["value"].to_numpy(), level, ci)
            rows.append({"method": method, "metric": metric, "seeds": est.n, "mean": est.mean,
                         "std": est.std, "ci_low": est.low, "ci_high": est.high})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _per_seed(scalars: pd.DataFrame, method: str, metric: str) -> dict[int, float]:
    rows = scalars[(scalars["method"] == method) & (scalars["metric"] == metric)]
    return dict(zip(rows["seed"].astype(int), rows["value"].astype(float), strict=True))


def compared_metrics(scalars: pd.DataFrame) -> list[str]:
    """The metrics compared with the baseline: ``COMPARED`` and validation Avg@k / Pass@k."""
    names = set(scalars["metric"])
    val = sorted(n for n in names if n.startswith("val/") and "/maj@" not in n)
    return [n for n in COMPARED if n in names] + val


def comparison_table(scalars: pd.DataFrame, baselines: dict[str, str], level: float = 0.95,
                     ci: CIMethod = "t") -> pd.DataFrame:
    """Each method's difference from its baseline method, paired over the seeds both share.

    ``baselines`` maps each method to the method it is compared with (with a grid: the
    baseline loss at the same grid point); a method mapped to itself is not compared.

    Columns: ``method, baseline, metric, seeds, difference, ci_low, ci_high, p_improvement,
    significant`` (``p_improvement``: P(method > baseline) over the runs of the shared seeds;
    ``significant``: whether the interval of the difference excludes 0). Empty when no method
    shares a seed with its baseline.
    """
    columns = ["method", "baseline", "metric", "seeds", "difference", "ci_low", "ci_high",
               "p_improvement", "significant"]
    rows = []
    for method in _methods(scalars):
        baseline = baselines[method]
        if method == baseline:
            continue
        for metric in compared_metrics(scalars):
            x, y = _per_seed(scalars, method, metric), _per_seed(scalars, baseline, metric)
            seeds = sorted(set(x) & set(y))
            if not seeds:
                continue
            est = paired_difference(x, y, level, ci)
            poi = probability_of_improvement([x[s] for s in seeds], [y[s] for s in seeds])
            rows.append({"method": method, "baseline": baseline, "metric": metric,
                         "seeds": len(seeds),
                         "difference": est.mean, "ci_low": est.low, "ci_high": est.high,
                         "p_improvement": poi, "significant": est.excludes_zero})
    return pd.DataFrame(rows, columns=columns)


def fmt(value: float) -> str:
    """A number for the report: 3 decimals below 1, 2 below 100, none above; ``–`` for NaN."""
    if np.isnan(value):
        return "–"
    size = abs(value)
    text = f"{value:.3f}" if size < 1 else f"{value:.2f}" if size < 100 else f"{value:.0f}"
    return text.removeprefix("-") if float(text) == 0 else text  # no "-0.000"


def _cell(row: pd.Series, ci: CIMethod) -> str:
    if np.isnan(row["ci_low"]):
        return fmt(row["mean"])
    if ci == "t":
        return f"{fmt(row['mean'])} ± {fmt(row['ci_high'] - row['mean'])}"
    return f"{fmt(row['mean'])} [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_report(summary: pd.DataFrame, comparison: pd.DataFrame, settings: dict,
                  progress: dict[str, list[str]], level: float = 0.95, ci: CIMethod = "t") -> str:
    """The text of ``report.md``.

    Args:
        summary: :func:`summary_table`'s table.
        comparison: :func:`comparison_table`'s table.
        settings: ``sweep.json`` (``command``, ``config``, ``losses``, ``seeds``, ``set``,
            ``grid``, ``baseline``).
        progress: run ids by state: ``finished``, ``failed``, ``unfinished``.
        level: the confidence level.
        ci: the interval method.
    """
    pct = f"{level:.0%}"
    ci_name = "Student t interval" if ci == "t" else "percentile bootstrap (scipy, 9999 resamples)"
    lines = [f"# Sweep `{Path(settings['out']).name}`", "",
             f"Command: `{settings['command']}`", "",
             f"- task config: `{settings['config']}`",
             f"- losses: {', '.join(f'`{loss}`' for loss in settings['losses'])}",
             f"- seeds: {' '.join(str(s) for s in settings['seeds'])}",
             f"- overrides (`--set`): {', '.join(f'`{s}`' for s in settings['set']) or 'none'}",
             f"- grid: {', '.join(f'`{g}`' for g in settings['grid']) or 'none'}",
             f"- runs: {len(progress['finished'])} finished, {len(progress['failed'])} failed, "
             f"{len(progress['unfinished'])} not finished",
             f"- \"final\" = mean of the last {LAST_EPOCHS} epochs; intervals: {pct} {ci_name} "
             "across seeds", ""]
    if progress["failed"]:
        lines += [f"Failed runs (not in the tables): {', '.join(progress['failed'])}", ""]
    if progress["unfinished"]:
        lines += [f"Unfinished runs (not in the tables): {', '.join(progress['unfinished'])}", ""]
    metrics = list(dict.fromkeys(summary["metric"]))
    header = ["method", "seeds", *[_TITLES.get(m, m) for m in metrics]]
    rows = []
    for method in dict.fromkeys(summary["method"]):
        part = summary[summary["method"] == method].set_index("metric")
        rows.append([method, str(int(part["seeds"].max())),
                     *[_cell(part.loc[m], ci) if m in part.index else "–" for m in metrics]])
    lines += [f"## Results (mean ± {pct} CI across seeds)", "", *_markdown(header, rows), ""]
    baseline = settings["baseline"]
    lines += [f"## Difference from `{baseline}` (paired over shared seeds)", ""]
    if settings["grid"]:
        lines += [f"Each grid point is compared with `{baseline}` at the same grid point.", ""]
    if comparison.empty:
        lines += [f"No comparison: `{baseline}` has no finished run sharing a seed with another "
                  "method.", ""]
    else:
        rows = [[r.method, _TITLES.get(r.metric, r.metric), str(r.seeds), fmt(r.difference),
                 f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]", fmt(r.p_improvement),
                 "yes" if r.significant else "no"] for r in comparison.itertuples()]
        lines += _markdown(["method", "metric", "seeds", "difference", f"{pct} CI",
                            "P(improvement)", "CI excludes 0"], rows)
        lines += ["", f"P(improvement): P(method > `{baseline}`) + ½ P(tie) over all pairs of "
                  "their runs on the shared seeds (rliable's definition). A difference whose "
                  "interval includes 0 is not significant at this number of seeds.", ""]
    lines += ["## Metrics", "", *[f"- `{k}`: {v}" for k, v in METRIC_DEFINITIONS.items()], "",
              "![curves: mean across seeds with its band](curves.png)", ""]
    return "\n".join(lines)
