"""Run folders: one per run, reopened by ``--ckpt_path last``, and honest exit codes.

A run's folder is ``<save_dir>/<name>/version_<n>`` (the CSV or TensorBoard logger's
``log_dir``), with ``config.yaml`` (LightningCLI's saved config), ``metrics.csv``,
``completions.jsonl`` and ``checkpoints/last.ckpt``. Three rules:

- **One run, one folder.** The process that will be global rank 0 claims the folder before
  anything is built, with an atomic ``os.mkdir`` (the next free number; a number another run took
  first is skipped), and writes the number into the config, so the saved ``config.yaml`` names
  its own folder (:func:`prepare_fit`). Two runs started at once never share a folder. The other
  ranks take rank 0's folder through Lightning's broadcast of ``trainer.log_dir``.
- **``--ckpt_path last`` resumes the run the config names.** With a run's own ``config.yaml``,
  ``last`` is that folder's ``checkpoints/last.ckpt`` (or the ``last.ckpt`` in a
  ``ModelCheckpoint``'s explicit ``dirpath``); a missing one is an error listing where it looked.
  The resumed run writes into the same folder: the rows of ``metrics.csv`` and
  ``completions.jsonl`` that the interrupted run wrote after its checkpoint are dropped and the
  new ones appended (:func:`reopen_run_logs`), so no epoch appears twice.
- **An interrupted run exits non-zero** (:func:`interrupted_exit`): SIGTERM → 143, SIGINT → 130,
  after Lightning stops at the end of the current optimiser step. The last completed epoch is
  the checkpoint ``ModelCheckpoint(save_last=True)`` wrote at that epoch's end; a partial epoch
  cannot be resumed exactly (its rollout is not in the checkpoint) and is redone on resume.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: Environment variables that hold a process's rank before the process group exists.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
#: Exit codes of an interrupted fit, as a shell reports a process killed by the signal.
EXIT_SIGTERM, EXIT_SIGINT = 128 + 15, 128 + 2


def is_launch_rank_zero() -> bool:
    """Whether this process will be global rank 0, from the launcher's environment variables.

    torchrun sets ``RANK``, Lightning's own launcher ``LOCAL_RANK``/``NODE_RANK`` in the
    processes it starts, SLURM ``SLURM_PROCID``; the first process of a plain launch has none.
    """
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in RANK_VARIABLES)


def prepare_fit(config: Namespace) -> None:
    """Check that ``fit`` trains something, resolve ``ckpt_path: last`` and claim the run folder.

    Called on the parsed ``fit`` config before anything is instantiated. On global rank 0 a logger
    without a ``version`` gets the next free one, claimed with ``os.mkdir``; a config that names
    an existing run's folder must resume it (``--ckpt_path``) if that run saved a checkpoint
    (:func:`start_over`).

    Raises:
        ValueError: for a no-op run (``max_epochs 0``, ``max_steps 0``,
            ``limit_train_batches 0``), for ``--ckpt_path last`` without a ``last.ckpt`` (naming
            the paths looked at), and for a fresh fit into a folder whose run has checkpoints.
    """
    _check_trains_something(config.trainer)
    loggers = folder_loggers(config.trainer.logger)
    if config.ckpt_path == "last":
        config.ckpt_path = str(find_last_checkpoint(config.trainer, loggers))
    if not is_launch_rank_zero():
        return
    for init_args in loggers:
        if init_args.version is None:
            init_args.version = claim_version(Path(root_dir(init_args)))
        elif config.ckpt_path is None:
            start_over(run_folder(init_args))


def start_over(folder: Path) -> None:
    """A fresh fit into a named run folder: an error if the run there has checkpoints.

    A run stopped before its first checkpoint (preempted in epoch 0) cannot be resumed; its logs
    (``metrics.csv``, ``*.jsonl``) are removed and the run starts over in its folder.

    Raises:
        ValueError: when ``folder/checkpoints`` holds a checkpoint.
    """
    checkpoints = sorted(path.name for path in (folder / "checkpoints").glob("*"))
    if checkpoints:
        raise ValueError(
            f"{folder} already holds a run with checkpoints ({', '.join(checkpoints)}): resume "
            "it with --ckpt_path last, or start a new run from a config without "
            "trainer.logger.init_args.version")
    for path in [folder / "metrics.csv", *folder.glob("*.jsonl")]:
        if path.is_file():
            print(f"dgpo: {path} is from a run that saved no checkpoint; starting over",
                  file=sys.stderr, flush=True)
            path.unlink()


def _check_trains_something(trainer: Namespace) -> None:
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if value is not None and value == 0:
            raise ValueError(f"trainer.{key} {value} trains nothing: allowed are a positive "
                             f"number{' or -1 (no limit)' if key != 'limit_train_batches' else ''}"
                             f" (or leave it unset)")


def folder_loggers(logger: Any) -> list[Namespace]:
    """The ``init_args`` of the configured loggers that write a versioned run folder.

    Those are :class:`CSVLogger` and :class:`TensorBoardLogger` (and subclasses) given by
    ``class_path``; ``logger: true`` (Lightning's default logger) and others have none.
    """
    entries = logger if isinstance(logger, list) else [logger]
    found = []
    for entry in entries:
        if isinstance(entry, Namespace) and "class_path" in entry:
            module, _, name = entry.class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            if issubclass(cls, (CSVLogger, TensorBoardLogger)):
                found.append(entry.init_args)
    return found


def root_dir(init_args: Namespace) -> str:
    """``<save_dir>/<name>`` of a CSV/TensorBoard logger (``name`` may be empty)."""
    name = init_args.get("name")
    save_dir = str(init_args.save_dir)
    return os.path.join(save_dir, name) if name else save_dir


def run_folder(init_args: Namespace) -> Path:
    """The run folder ``root_dir/version_<n>`` (or ``root_dir/<version>`` for a string)."""
    version = init_args.version
    return Path(root_dir(init_args), version if isinstance(version, str) else f"version_{version}")


def claim_version(root: Path) -> int:
    """Create ``root/version_<n>`` for the next free ``n`` above the existing ones; return ``n``.

    ``os.mkdir`` either creates the folder or fails because it exists, atomically, so of several
    runs that try the same number at once exactly one gets it and the others try the next.
    """
    root.mkdir(parents=True, exist_ok=True)
    versions = [int(path.name.removeprefix("version_")) for path in root.iterdir()
                if path.is_dir() and path.name.startswith("version_")
                and path.name.removeprefix("version_").isdigit()]
    version = max(versions, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def find_last_checkpoint(trainer: Namespace, loggers: list[Namespace]) -> Path:
    """``last.ckpt`` of the run the config names.

    It is looked for in each ``ModelCheckpoint``'s explicit ``dirpath``, or else in the first
    logger's ``<run folder>/checkpoints``.

    Raises:
        ValueError: when the config names no run folder (no logger ``version``) and no
            checkpoint ``dirpath``, or when no ``last.ckpt`` exists where it looked.
    """
    places = [Path(str(args.dirpath)) for args in _checkpoint_init_args(trainer)
              if args.get("dirpath") is not None]
    if not places and loggers and loggers[0].version is not None:
        places = [run_folder(loggers[0]) / "checkpoints"]
    if not places:
        raise ValueError(
            "--ckpt_path last: the config names no run (no trainer.logger.init_args.version and "
            "no ModelCheckpoint dirpath); pass the config.yaml saved in the run's folder "
            "(e.g. runs/tiny/version_0/config.yaml) or a checkpoint path")
    for place in places:
        if (place / "last.ckpt").exists():
            return (place / "last.ckpt").resolve()
    raise ValueError(f"--ckpt_path last: no last.ckpt in {', '.join(map(str, places))} (the run "
                     "saved no checkpoint yet, or it has no ModelCheckpoint with save_last=True)")


def _checkpoint_init_args(trainer: Namespace) -> list[Namespace]:
    callbacks = trainer.get("callbacks") or []
    found = []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(entry, Namespace) and "class_path" in entry:
            module, _, name = entry.class_path.rpartition(".")
            if issubclass(getattr(importlib.import_module(module), name), ModelCheckpoint):
                found.append(entry.init_args)
    return found


def reopen_run_logs(trainer: Trainer, ckpt_path: str | None) -> None:
    """Before a resumed fit: keep the rows the checkpoint covers in the run folder's logs.

    ``metrics.csv`` keeps the rows logged before the checkpoint (``step`` below the checkpoint's
    count of optimiser steps) and ``completions.jsonl`` the epochs the checkpoint completed; the
    resumed run appends from there. Lightning's CSV logger deletes an existing ``metrics.csv``
    when it opens its folder, so it is opened here and handed the kept rows and their columns.
    Only global rank 0 writes; a fresh run's (empty) folder is left alone.
    """
    if ckpt_path is None or not is_launch_rank_zero():  # the strategy knows no ranks yet
        return
    state = _checkpoint_state(Path(ckpt_path))
    steps = state["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    epoch_done = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]
    last_epoch = state["epoch"] if epoch_done else state["epoch"] - 1
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            _reopen_metrics(logger, steps)
    folder = Path(trainer.loggers[0].log_dir) if trainer.loggers and isinstance(
        trainer.loggers[0], (CSVLogger, TensorBoardLogger)) else None
    if folder is not None:
        for path in folder.glob("*.jsonl"):
            _keep_lines(path, lambda row: row.get("epoch", -1) <= last_epoch)


def _checkpoint_state(path: Path) -> dict[str, Any]:
    """The loop state of a checkpoint file, or of a sharded checkpoint folder's ``meta.pt``."""
    file = path / "meta.pt" if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def _reopen_metrics(logger: CSVLogger, steps: int) -> None:
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        columns = list(reader.fieldnames or [])
        rows = [row for row in reader if row["step"] == "" or int(row["step"]) < steps]
    moved = path.with_name(".metrics.csv.kept")
    os.replace(path, moved)
    with warnings.catch_warnings():  # "exists and is not empty ... will be deleted": not so here
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        experiment = logger.experiment
    with moved.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(moved, path)
    experiment.metrics_keys = sorted(columns)  # the next save appends under the same header


def _keep_lines(path: Path, keep: Any) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and keep(json.loads(line))]
    if len(kept) != len(lines):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, path)


def interrupted_exit(trainer: Trainer | None, error: SystemExit) -> SystemExit:
    """The exit of a fit stopped by SIGTERM (143) or SIGINT (130), with where to resume from.

    Lightning ends a fit on SIGTERM with :class:`SIGTERMException`, a ``SystemExit`` whose code
    is 0, and on SIGINT with ``sys.exit(1)``; a scheduler would record the first as a success.
    Any other ``SystemExit`` is returned unchanged.
    """
    if isinstance(error, SIGTERMException):
        code, signal_name = EXIT_SIGTERM, "SIGTERM"
    elif trainer is not None and trainer.interrupted and error.code == 1:
        code, signal_name = EXIT_SIGINT, "SIGINT"
    else:
        return error
    callbacks = trainer.checkpoint_callbacks if trainer is not None else []
    last = [callback.last_model_path for callback in callbacks
            if isinstance(callback, ModelCheckpoint) and callback.last_model_path]
    where = (f"the last completed epoch is in {last[0]}; resume with --ckpt_path last and the "
             "run's config.yaml" if last else "no epoch was completed and checkpointed")
    if trainer is None or trainer.is_global_zero:
        print(f"dgpo fit stopped by {signal_name} (exit code {code}): {where}", file=sys.stderr,
              flush=True)
    return SystemExit(code)
