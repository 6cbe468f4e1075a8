"""Gradient-weight analysis: the recorder callback, recorded runs, and the paper's figures.

- :class:`GradientWeightRecorder`: a callback that records real training tokens' IS ratios,
  probabilities, advantages, regions and every method's gradient weight into a Parquet file.
- :func:`load_run` / :func:`load_metrics`: read a recorded run and a run's logged metrics.
- :mod:`dgpo.analysis.figure2`, :mod:`dgpo.analysis.figure4`, :mod:`dgpo.analysis.dynamics`: the
  plots the notebooks draw (also command-line scripts: ``python -m dgpo.analysis.figure4 RUN...``).
- :func:`train_runs`: short comparison runs (one per method) for the notebooks.

Names are imported on first use, so that plotting or loading does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgpo.analysis.experiments import PRESETS, experiment_config, train_runs
    from dgpo.analysis.load import (
        RecordedRun,
        load_config,
        load_metrics,
        load_run,
        load_runs,
        read_meta,
        run_label,
    )
    from dgpo.analysis.recorder import GradientWeightRecorder
    from dgpo.analysis.reservoir import Reservoir
    from dgpo.analysis.schema import COLUMNS, METHOD_PREFIX, RECORDING
    from dgpo.analysis.weights import (
        WEIGHT_KINDS,
        comparison_losses,
        convert_weight,
        method_name,
        weight_curve,
    )

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "PRESETS": "experiments", "experiment_config": "experiments", "train_runs": "experiments",
    "RecordedRun": "load", "load_config": "load", "load_metrics": "load", "load_run": "load",
    "load_runs": "load", "read_meta": "load", "run_label": "load",
    "GradientWeightRecorder": "recorder", "Reservoir": "reservoir",
    "COLUMNS": "schema", "METHOD_PREFIX": "schema", "RECORDING": "schema",
    "WEIGHT_KINDS": "weights", "comparison_losses": "weights", "convert_weight": "weights",
    "method_name": "weights", "weight_curve": "weights",
}

__all__ = [
    "COLUMNS",
    "METHOD_PREFIX",
    "PRESETS",
    "RECORDING",
    "WEIGHT_KINDS",
    "GradientWeightRecorder",
    "RecordedRun",
    "Reservoir",
    "comparison_losses",
    "convert_weight",
    "experiment_config",
    "load_config",
    "load_metrics",
    "load_run",
    "load_runs",
    "method_name",
    "read_meta",
    "run_label",
    "train_runs",
    "weight_curve",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dgpo.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dgpo.analysis.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted(set(globals()) | set(_EXPORTS))
