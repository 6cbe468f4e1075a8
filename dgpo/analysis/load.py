"""Load recorded runs: the recorder's token table, its metadata, a run's config and its logs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dgpo.analysis.schema import METHOD_PREFIX, RECORDING
from dgpo.analysis.weights import METHOD_LABELS, WeightKind, convert_weight
from dgpo.losses import LOSSES, REGION_NAMES

METRICS = "metrics.csv"


@dataclass
class RecordedRun:
    """A run's recorded tokens (one row per token) and the recorder's metadata.

    Attributes:
        path: the run's folder (the Parquet file's folder).
        tokens: the token table (columns as in :data:`dgpo.analysis.schema.COLUMNS`, plus one
            ``w_<method>`` per compared method); ``region`` is categorical in IN, LN, LP, HN, HP.
        meta: the recorder's metadata (``method``, ``loss``, ``clip_low``, ``clip_high``, ...).
    """

    path: Path
    tokens: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The trained method's built-in name (or its class name for a user's loss)."""
        return str(self.meta.get("method", "unknown"))

    @property
    def label(self) -> str:
        """Display name of the trained method."""
        return METHOD_LABELS.get(self.method, self.method)

    @property
    def methods(self) -> list[str]:
        """Methods whose weights were recorded on these tokens (``w_<method>`` columns)."""
        return [c[len(METHOD_PREFIX):] for c in self.tokens.columns if c.startswith(METHOD_PREFIX)]

    def weights(self, method: str | None = None, kind: WeightKind = "relative") -> np.ndarray:
        """Per-token weights of ``method`` (``None``: the trained loss's ``prob_weight``).

        Args:
            method: a recorded method name, or ``None`` for the weight the run trained with.
            kind: ``"relative"`` (``W·π_old``), ``"prob"`` (``W``) or ``"logprob"`` (``W·π``).

        Raises:
            KeyError: for a method that was not recorded (the message lists those that were).
        """
        column = "prob_weight" if method is None else METHOD_PREFIX + method
        if column not in self.tokens.columns:
            raise KeyError(f"{self.path} has no weights of {method!r}; recorded: {self.methods}")
        frame = self.tokens
        return convert_weight(frame[column].to_numpy(), frame["prob"].to_numpy(),
                              frame["old_prob"].to_numpy(), kind)


def find_file(path: str | Path, name: str) -> Path:
    """``path`` itself if it is a file, else the one file called ``name`` in or under it.

    Raises:
        FileNotFoundError: when there is none, or several (the message lists them).
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / name).is_file():
        return path / name
    found = sorted(path.rglob(name)) if path.is_dir() else []
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(map(str, found))}) "
        raise FileNotFoundError(f"found {what} {name} in {path}; pass the run's folder")
    return found[0]


def load_run(path: str | Path) -> RecordedRun:
    """Load a recorded run from its folder (or a folder above it, or the Parquet file itself).

    Raises:
        FileNotFoundError: when no (or more than one) recording is found.
    """
    import pyarrow.parquet as pq

    file = find_file(path, RECORDING)
    table = pq.read_table(file)
    raw = (table.schema.metadata or {}).get(b"dgpo")
    meta = json.loads(raw) if raw else {}
    tokens = table.to_pandas()
    tokens["region"] = pd.Categorical(tokens["region"].astype(str), categories=REGION_NAMES)
    return RecordedRun(path=file.parent, tokens=tokens, meta=meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The recorder's metadata of a run, without reading its token table.

    Raises:
        FileNotFoundError: when no (or more than one) recording is found.
    """
    import pyarrow.parquet as pq

    raw = (pq.read_schema(find_file(path, RECORDING)).metadata or {}).get(b"dgpo")
    return json.loads(raw) if raw else {}


def load_runs(paths: Iterable[str | Path]) -> list[RecordedRun]:
    """Load several recorded runs (see :func:`load_run`)."""
    return [load_run(path) for path in paths]


def load_config(path: str | Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` (as LightningCLI saved it), or ``None`` if it has none."""
    import yaml

    try:
        file = find_file(path, "config.yaml")
    except FileNotFoundError:
        return None
    return yaml.safe_load(file.read_text())


def load_metrics(path: str | Path, per_epoch: bool = True) -> pd.DataFrame:
    """A run's ``metrics.csv`` (CSVLogger), averaged per epoch by default.

    Args:
        path: the run's folder (or a folder above it, or the CSV file).
        per_epoch: average the rows of each epoch (one row per epoch, indexed by epoch).

    Raises:
        FileNotFoundError: when no (or more than one) ``metrics.csv`` is found.
    """
    frame = pd.read_csv(find_file(path, METRICS))
    if not per_epoch or "epoch" not in frame.columns:
        return frame
    return frame.groupby("epoch").mean(numeric_only=True)


def run_label(path: str | Path) -> str:
    """A display name for a run: its loss (from the recording or ``config.yaml``) or its folder."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    try:
        meta = read_meta(path)
        return METHOD_LABELS.get(meta.get("method", ""), meta.get("method") or folder.name)
    except FileNotFoundError:
        pass
    config = load_config(path) or {}
    loss = (config.get("model") or {}).get("loss")
    if isinstance(loss, dict):
        loss = str(loss.get("class_path", "")).rsplit(".", 1)[-1]
    if isinstance(loss, str) and loss:
        for name, cls in LOSSES.items():
            if loss in (name, cls.__name__):
                return METHOD_LABELS[name]
        return loss
    return folder.name
