"""Planning a sweep: the runs (loss × grid point × seed), their folders and ``fit`` commands.

A sweep folder holds ``sweep.json`` (the settings and the command) and one folder per run under
``runs/``; each run folder holds ``run.json`` (its method, seed and ``fit`` arguments), written
before the run starts, so that any one run can be rerun, resumed or submitted alone.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dgpo.losses import LOSSES

RUNS_DIR = "runs"
RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass(frozen=True)
class Run:
    """One run of a sweep: an ordinary ``python -m dgpo fit`` in its own folder.

    Attributes:
        run_id: the folder name under ``<out>/runs`` (file-system safe).
        method: the label the statistics group by: the loss name, plus the grid point if any.
        loss: a built-in loss name or the path of a loss config file.
        seed: the run's ``seed_everything``.
        grid: the grid point, ``(("model.lr", "2e-5"), ...)``; empty without ``--grid``.
        run_dir: the run's folder (absolute).
        fit_args: the arguments after ``python -m dgpo`` (``fit --config ...``).
    """

    run_id: str
    method: str
    loss: str
    seed: int
    grid: tuple[tuple[str, str], ...]
    run_dir: str
    fit_args: tuple[str, ...]

    def to_json(self) -> dict:
        """The run as a JSON object (``run.json``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Run:
        """Rebuild a run from :meth:`to_json`'s object."""
        return cls(run_id=data["run_id"], method=data["method"], loss=data["loss"],
                   seed=int(data["seed"]), grid=tuple((k, v) for k, v in data["grid"]),
                   run_dir=data["run_dir"], fit_args=tuple(data["fit_args"]))


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` (a dotted LightningCLI key) into ``(key, value)``.

    Raises:
        ValueError: when ``text`` has no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise ValueError(f"{option} {text!r}: expected KEY=VALUE with a dotted config key, "
                         "e.g. trainer.max_epochs=30")
    return key, value


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """Parse ``--grid KEY=V1,V2,...`` items into ``[(key, [v1, v2, ...]), ...]``.

    Raises:
        ValueError: for a malformed item, an empty value or a key given twice.
    """
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, values = parse_assignment(item, "--grid")
        choices = [v.strip() for v in values.split(",")]
        if any(not v for v in choices):
            raise ValueError(f"--grid {item!r}: empty value; expected KEY=V1,V2,...")
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid {key!r} given twice; give all its values in one KEY=V1,V2")
        grid.append((key, choices))
    return grid


def loss_label(loss: str) -> str:
    """The method name of a loss: the built-in name, or a config file's stem.

    Raises:
        ValueError: for a name that is neither a built-in loss nor an existing file.
    """
    if loss in LOSSES:
        return loss
    path = Path(loss)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise ValueError(f"--losses {loss!r}: no such loss config file")
        return path.stem
    raise ValueError(f"--losses {loss!r}: not a built-in loss ({', '.join(LOSSES)}) "
                     "nor a loss config file (.yaml)")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)


def fit_arguments(config: str, loss: str, seed: int, sets: list[tuple[str, str]],
                  grid_point: tuple[tuple[str, str], ...], run_dir: Path) -> list[str]:
    """The ``fit`` arguments of one run (everything after ``python -m dgpo``).

    The task config comes first, then the loss (``--config <file>`` or ``--model.loss <name>``),
    the seed, the ``--set`` and grid overrides, and last the run folder: a CSVLogger whose
    ``save_dir/name/version`` is the run folder (so ``metrics.csv``, ``config.yaml``,
    ``completions.jsonl`` and ``checkpoints/`` land there) and the trainer's
    ``default_root_dir``. The logger replaces the task config's logger (the sweep reads
    ``metrics.csv``).
    """
    args = ["fit", "--config", config]
    args += ["--model.loss", loss] if loss in LOSSES else ["--config", str(Path(loss).resolve())]
    args += ["--seed_everything", str(seed)]
    args += [f"--{key}={value}" for key, value in [*sets, *grid_point]]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run_dir.parent.parent), "name": run_dir.parent.name,
                            "version": run_dir.name}}
    args += ["--trainer.default_root_dir", str(run_dir),
             "--trainer.logger", json.dumps(logger, separators=(",", ":"))]
    return args


def plan_runs(config: str, losses: list[str], seeds: list[int], sets: list[tuple[str, str]],
              grid: list[tuple[str, list[str]]], out: Path) -> list[Run]:
    """Every run of the sweep, seed by seed, each seed for every method in turn.

    Args:
        config: the task config file.
        losses: built-in loss names or loss config files.
        seeds: the ``seed_everything`` values.
        sets: ``(key, value)`` overrides applied to every run.
        grid: ``(key, values)``: every combination is a method of its own per loss.
        out: the sweep folder.

    Raises:
        ValueError: for an unknown loss, a missing config, no seeds, a repeated seed, or two
            losses with the same name.
    """
    if not Path(config).is_file():
        raise ValueError(f"--config {config!r}: no such file")
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: a seed is repeated")
    labels = [loss_label(loss) for loss in losses]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--losses {losses}: two losses share the method name in {labels}; "
                         "rename one of the loss config files")
    config = str(Path(config).resolve())
    runs_root = out.resolve() / RUNS_DIR
    points = list(itertools.product(*[[(key, v) for v in values] for key, values in grid]))
    runs = []
    # Seed by seed, so that a sweep stopped part-way has the same seeds for every method.
    for seed in seeds:
        for loss, label in zip(losses, labels, strict=True):
            for point in points:
                method = " ".join([label, *(f"{key}={value}" for key, value in point)])
                run_id = _safe("+".join([label, *(f"{k}={v}" for k, v in point)]) + f"-s{seed}")
                run_dir = runs_root / run_id
                args = fit_arguments(config, loss, seed, sets, point, run_dir)
                runs.append(Run(run_id, method, loss, seed, point, str(run_dir), tuple(args)))
    return runs


def write_run(run: Run) -> None:
    """Write ``run.json`` into the run's folder, or check that the one there plans the same run.

    Raises:
        ValueError: when the folder already holds a different run (other ``fit`` arguments): a
            sweep folder keeps its settings; start a new one with another ``--out``.
    """
    path = Path(run.run_dir) / RUN_FILE
    if path.is_file():
        old = Run.from_json(json.loads(path.read_text()))
        if old != run:
            changed = sorted(set(old.fit_args) ^ set(run.fit_args))
            raise ValueError(f"run {run.run_id!r} in {run.run_dir} was planned with other "
                             f"settings (differing arguments: {changed}); use another --out "
                             "for new settings")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run.to_json(), indent=2) + "\n")


def read_runs(out: Path) -> list[Run]:
    """The runs planned in a sweep folder (every ``runs/*/run.json``), in folder-name order."""
    return [Run.from_json(json.loads(p.read_text()))
            for p in sorted((out / RUNS_DIR).glob(f"*/{RUN_FILE}"))]


def write_sweep(out: Path, settings: dict) -> None:
    """Write ``sweep.json``: the settings and command of the sweep (the report quotes them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def read_sweep(out: Path) -> dict:
    """Read ``sweep.json``.

    Raises:
        ValueError: when ``out`` holds no ``sweep.json``.
    """
    path = out / SWEEP_FILE
    if not path.is_file():
        raise ValueError(f"--report {str(out)!r}: no {SWEEP_FILE} there; is it a sweep folder?")
    return json.loads(path.read_text())
