"""The results table: each benchmark's Avg@k and Pass@k and their mean, as JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MEAN = "mean"
LABELS = {"response_length": "Length (tokens)", "truncated": "Truncated (%)"}


def results_record(model: str, scores: dict[str, dict[str, float]], settings: dict[str, Any],
                   problems: dict[str, int]) -> dict[str, Any]:
    """Collect what ``results.json`` holds.

    Args:
        model: The evaluated model (checkpoint path or model name).
        scores: ``{benchmark: {metric: value}}`` with the mean over benchmarks under ``"mean"``;
            accuracies are fractions in [0, 1].
        settings: The evaluation settings (k, temperature, ...).
        problems: Problems evaluated per benchmark.

    Returns:
        ``{"model", "settings", "benchmarks": {name: {"problems", metric: value}}, "mean"}``.

    """
    benchmarks = {name: {"problems": problems.get(name, 0), **values}
                  for name, values in scores.items() if name != MEAN}
    return {"model": model, "settings": settings, "benchmarks": benchmarks,
            "mean": scores.get(MEAN, {})}


def markdown_table(record: dict[str, Any], metrics: list[str]) -> str:
    """Render a results record in the paper's layout: one row per model, per benchmark columns.

    Accuracies are printed as percentages with one decimal. Every benchmark (and the mean) gets
    one column per metric in ``metrics`` (e.g. ``avg@32``, ``pass@32``); a second table has a
    row per benchmark with its number of problems and every metric (Maj@k, response length...).

    Args:
        record: A record from :func:`results_record`.
        metrics: The accuracy metrics to show in the main table.

    Returns:
        Markdown text.

    """
    names = list(record["benchmarks"])
    header = ["Model"] + [f"{name} {_label(m)}" for name in [*names, "Mean"] for m in metrics]
    row = [f"`{record['model']}`"]
    for values in [*(record["benchmarks"][n] for n in names), record["mean"]]:
        row += [_percent(values.get(m)) for m in metrics]
    lines = [_row(header), _row(["---"] * len(header)), _row(row), ""]

    columns = [key for key in record["mean"] if key != "problems"]
    header = ["Benchmark", "Problems", *[_label(m) for m in columns]]
    lines += [_row(header), _row(["---"] * len(header))]
    total = sum(b["problems"] for b in record["benchmarks"].values())
    for name in [*names, MEAN]:
        values = record["benchmarks"].get(name, record["mean"]) if name != MEAN else record["mean"]
        problems = values.get("problems", total)
        cells = [_format(m, values.get(m)) for m in columns]
        lines.append(_row([name if name != MEAN else "Mean", str(problems), *cells]))
    settings = ", ".join(f"{key}={value}" for key, value in record["settings"].items())
    return "\n".join(lines) + f"\n\nSettings: {settings}.\n"


def write_results(directory: str | Path, record: dict[str, Any], metrics: list[str]) -> Path:
    """Write ``results.json`` and ``results.md`` into ``directory``.

    Args:
        directory: The run's log folder (created if missing).
        record: A record from :func:`results_record`.
        metrics: The accuracy metrics of the Markdown table's main columns.

    Returns:
        The path of ``results.md``.

    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    path = directory / "results.md"
    path.write_text(markdown_table(record, metrics))
    return path


def _label(metric: str) -> str:
    name, _, k = metric.partition("@")
    if not k:
        return LABELS.get(metric, metric)
    return f"{name.capitalize()}@{k}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if metric == "response_length" else _percent(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
