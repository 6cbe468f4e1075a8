"""What a run prints: a quiet console by default, everything with ``--verbose``.

Quiet (the default), the console shows Lightning's progress bar, one summary line per epoch
(:class:`dgpo.progress.EpochSummary`) and errors. The rest goes to ``console.log`` in the run
folder: the INFO and WARNING records of vLLM, Lightning, transformers and every other library that
logs through :mod:`logging`. Warnings known to be harmless in a dgpo run are not shown at all
(:data:`HARMLESS_WARNINGS`); any other Python warning is still printed. Verbose (``--verbose`` on
the command line, or ``DGPO_VERBOSE=1``) leaves every library's output as it is.

Each library is told at its own switch: vLLM by ``VLLM_CONFIGURE_LOGGING=0`` (set before vLLM is
imported, so it installs no console handler; an explicit value in the environment wins),
transformers and huggingface_hub by their progress-bar and handler switches, Lightning by moving
its INFO records from its console handler to the log file (and ``dgpo.cli`` turns its model summary
off), vLLM's progress bars by ``VLLMEngine(progress_bar=None)``, and native code that writes to
the process's stderr while vLLM starts by :func:`native_stderr_to_log`.

``--verbose`` is dgpo's bare flag, removed before LightningCLI parses the command line; the
``verbose`` argument of Lightning's ``validate``/``test`` stays reachable as ``--verbose=false``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub.utils
import transformers

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "DGPO_VERBOSE"
VERBOSE_HELP = (f"{VERBOSE_FLAG} (anywhere on the command line) or {VERBOSE_ENV}=1: show every "
                "library's output; by default the console shows the progress bar, one line per "
                "epoch and errors, and the rest goes to console.log in the run folder.")
LOG_FILE = "console.log"
BUFFERED_RECORDS = 10_000
"""Records kept in memory until the run folder is known; older ones are dropped."""

HARMLESS_WARNINGS = (
    # fit without benchmarks: validation is simply skipped
    r"You defined a `validation_step` but have no `val_dataloader`",
    # the frozen reference model is in eval mode on purpose
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # dgpo logs per epoch; the step loss is in the progress bar
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # `test --ckpt_path` of another run: evaluation needs the weights, not the checkpoint callback's
    # best-k bookkeeping
    r"The dirpath has changed from .* therefore `best_model_score`",
    # deprecations inside Lightning and vLLM, not in dgpo's code
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`torch\.distributed\.reduce_op` is deprecated",
)
"""Start of the message of each warning that a quiet console hides (regular expressions)."""

SINGLE_PROCESS_WARNINGS = (
    # an in-process vLLM creates a world-size-1 process group; there is nothing to synchronise
    r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level",
)
"""Warnings hidden only when the trainer runs a single process (see :meth:`RunLog.open`)."""

CONSOLE_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
"""Loggers that print to the console with their own handler; quiet, their records go to the file."""

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ERRORS_HANDLER = "dgpo-errors"


def split_verbose(args: list[str] | dict[str, Any], environ: Mapping[str, str] | None = None
                  ) -> tuple[bool, list[str] | dict[str, Any]]:
    """Whether the run is verbose, and the arguments without ``--verbose``.

    Args:
        args: command-line arguments, or a config dict (returned as it is: only the environment
            can make it verbose).
        environ: the environment (default ``os.environ``); ``DGPO_VERBOSE`` set to anything but
            ``""`` or ``"0"`` means verbose.

    Returns:
        ``(verbose, args)`` with every ``--verbose`` removed from ``args``.

    Example:
        >>> split_verbose(["fit", "--verbose", "--config", "c.yaml"], environ={})
        (True, ['fit', '--config', 'c.yaml'])

    """
    environ = os.environ if environ is None else environ
    verbose = environ.get(VERBOSE_ENV, "0") not in ("", "0")
    if isinstance(args, dict):
        return verbose, args
    rest = [a for a in args if a != VERBOSE_FLAG]
    return verbose or len(rest) < len(args), rest


class RunLog(logging.Handler):
    """The log file of a quiet run: holds records in memory until :meth:`open` names the folder."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(FORMAT))
        self._pending: deque[logging.LogRecord] = deque(maxlen=BUFFERED_RECORDS)
        self._file: logging.FileHandler | None = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` to the file, or keep it until the file is open."""
        if self._file is None:
            self._pending.append(record)
        else:
            self._file.emit(record)

    def open(self, folder: str | os.PathLike[str], rank: int = 0, world_size: int = 1) -> Path:
        """Start writing to ``folder/console.log`` (``console.rank<N>.log`` on ranks N > 0).

        With a single process, also hides :data:`SINGLE_PROCESS_WARNINGS`. Opening again (e.g. a
        test after a fit in one process) moves to the new file.

        Returns:
            The path of the log file.

        """
        if world_size == 1:
            for message in SINGLE_PROCESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
        name = LOG_FILE if rank == 0 else f"console.rank{rank}.log"
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.close_file()
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(self.formatter)
        self.path = path
        while self._pending:
            self._file.emit(self._pending.popleft())
        return path

    def close_file(self) -> None:
        """Close the file; later records are held in memory again."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the file and detach (``logging.Handler.close``)."""
        self.close_file()
        super().close()


def quiet_console() -> RunLog:
    """Route library logging to a :class:`RunLog` and hide known-harmless warnings.

    Call it before vLLM is imported (``dgpo.cli.main`` does): vLLM reads
    ``VLLM_CONFIGURE_LOGGING`` once, at import.

    Returns:
        The handler that collects the log; :class:`dgpo.progress.EpochSummary` opens its file
        in the run folder.

    """
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    huggingface_hub.utils.disable_progress_bars()
    for name in CONSOLE_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console handler Lightning added
                logger.removeHandler(handler)
        logger.propagate = True
    root = logging.getLogger()
    for handler in list(root.handlers):  # from an earlier run in this process
        if isinstance(handler, RunLog) or handler.get_name() == ERRORS_HANDLER:
            root.removeHandler(handler)
            handler.close()
    run_log = RunLog()
    errors = logging.StreamHandler()
    errors.set_name(ERRORS_HANDLER)
    errors.setLevel(logging.ERROR)
    errors.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(run_log)
    root.addHandler(errors)
    root.setLevel(logging.INFO)
    return run_log



def is_quiet() -> bool:
    """Whether :func:`quiet_console` is in effect (a :class:`RunLog` on the root logger)."""
    return any(isinstance(handler, RunLog) for handler in logging.getLogger().handlers)


@contextlib.contextmanager
def native_stderr_to_log(name: str) -> Iterator[None]:
    """While quiet, send what is written to file descriptor 2 in the block to the log.

    For native code that prints past Python's logging (vLLM's CPU worker start prints a C++
    "NUMA binding" warning). Each line becomes a record of logger ``name``: WARNING, or ERROR (so
    also on the console) when the block raises. Not quiet: nothing changes.
    """
    if not is_quiet():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            level = logging.ERROR if failed else logging.WARNING
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip():
                    logging.getLogger(name).log(level, line)
