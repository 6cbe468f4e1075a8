"""Short comparison runs (one per method) with the gradient-weight recorder, for the notebooks.

Two presets, the same for every method except the loss:

- ``"tiny"``: the random ``builtin:tiny-qwen2`` with the Hugging Face engine and the dense toy
  reward :class:`~dgpo.rewards.toy.DigitFractionReward` (a random model never solves arithmetic);
  16 sequences per rollout in mini-batches of 4, two passes: 8 optimiser steps per rollout, at a
  large learning rate so that many tokens leave the trust region. Seconds per run: for tests.
- ``"cpu"``: ``builtin:smollm2-135m-instruct`` learning to add two numbers with the vLLM engine and
  the math-verify reward (as ``configs/quickstart.yaml``): 8 prompts × 8 samples per rollout, 4
  mini-batches of 16, two passes (8 optimiser steps per rollout), lr 2e-5, 3 rollouts. 21–24
  minutes per run measured on a busy shared 2-core CPU; less on an idle one.

Example:
    >>> runs = train_runs(["grpo", "gppo", "dgpo"], preset="tiny", root="runs/figures")
    ...     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dgpo.analysis.schema import RECORDING
from dgpo.losses import LOSSES

#: Rollout settings of each preset (the RolloutCallback's init_args).
_ROLLOUT: dict[str, dict[str, Any]] = {
    "tiny": {
        "engine": {"class_path": "dgpo.rollout.TransformersEngine"},
        "reward": {"class_path": "dgpo.rewards.toy.DigitFractionReward"},
        "n": 4, "rollout_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2,
        "max_new_tokens": 16,
    },
    "cpu": {
        "engine": {"class_path": "dgpo.rollout.VLLMEngine",
                   "init_args": {"dtype": "float32", "kv_cache_space_gib": 1.0,
                                 "max_model_len": 512}},
        "reward": {"class_path": "dgpo.rewards.MathVerifyReward",
                   "init_args": {"extraction": "lenient", "timeout_s": 5.0, "num_workers": 2}},
        "n": 8, "rollout_batch_size": 8, "mini_batch_size": 16, "ppo_epochs": 2,
        "temperature": 1.0, "max_new_tokens": 48,
    },
}
#: Model and data settings of each preset.
_MODEL: dict[str, dict[str, Any]] = {
    "tiny": {"model_name_or_path": "builtin:tiny-qwen2", "lr": 1.0e-3, "micro_batch_size": 8},
    "cpu": {"model_name_or_path": "builtin:smollm2-135m-instruct", "lr": 2.0e-5,
            "max_grad_norm": 1.0, "micro_batch_size": 16},
}
_DATA: dict[str, dict[str, Any]] = {
    "tiny": {"synthetic": {"num_problems": 32, "max_operand": 20}, "max_prompt_length": 128},
    "cpu": {"synthetic": {"num_problems": 512, "max_operand": 20},
            "template": "{problem}\nPut the final answer in \\boxed{{}}.",
            "use_chat_template": True, "max_prompt_length": 128},
}
#: The recorder's settings when none are given (as the Figure 4 notebook's defaults, so that the
#: Figure 3 notebook finds and reuses its runs).
DEFAULT_RECORDER: dict[str, Any] = {"tokens_per_step": 256, "max_rows": 100_000}
#: Default number of epochs (rollouts) of each preset.
PRESET_EPOCHS: dict[str, int] = {"tiny": 1, "cpu": 3}
PRESETS: tuple[str, ...] = tuple(_ROLLOUT)


def experiment_config(method: str, preset: str = "tiny", root: str | Path = "runs/figures",
                      epochs: int | None = None, recorder: Mapping[str, Any] | None = None,
                      overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``python -m dgpo fit`` config of one comparison run.

    The run's folder is ``<root>/<method>/version_0`` (CSV logger), where the recorder writes
    ``gradient_weights.parquet`` beside ``metrics.csv`` and ``config.yaml``.

    Args:
        method: a built-in loss name (``"grpo"``, ``"gppo"``, ``"dgpo"``, ...), with its defaults.
        preset: ``"tiny"`` or ``"cpu"`` (see the module docstring).
        root: folder of the runs.
        epochs: epochs (rollouts); defaults to the preset's.
        recorder: init_args of the :class:`~dgpo.analysis.GradientWeightRecorder`; defaults to
            :data:`DEFAULT_RECORDER`.
        overrides: dotted keys to change, e.g. ``{"model.lr": 1e-5,
            "trainer.callbacks.0.init_args.ppo_epochs": 1, "model.loss.init_args.n": 2}``.

    Raises:
        ValueError: for an unknown method or preset.
    """
    if method not in LOSSES:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(LOSSES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    loss = LOSSES[method]
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": PRESET_EPOCHS[preset] if epochs is None else epochs,
            "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "default_root_dir": str(root), "log_every_n_steps": 1, "num_sanity_val_steps": 0,
            "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": method, "version": 0}},
            "callbacks": [
                {"class_path": "dgpo.rollout.RolloutCallback",
                 "init_args": copy.deepcopy(_ROLLOUT[preset])},
                {"class_path": "dgpo.analysis.GradientWeightRecorder",
                 "init_args": dict(DEFAULT_RECORDER if recorder is None else recorder)},
            ],
        },
        "model": {**copy.deepcopy(_MODEL[preset]),
                  "loss": {"class_path": f"{loss.__module__}.{loss.__name__}", "init_args": {}}},
        "data": copy.deepcopy(_DATA[preset]),
    }
    for dotted, value in (overrides or {}).items():
        _set(config, dotted, value)
    return config


def run_dir(root: str | Path, method: str) -> Path:
    """The folder of a comparison run (see :func:`experiment_config`)."""
    return Path(root) / method / "version_0"


def train_runs(methods: Sequence[str] = ("grpo", "gppo", "dgpo"), preset: str = "tiny",
               root: str | Path = "runs/figures", epochs: int | None = None,
               recorder: Mapping[str, Any] | None = None,
               overrides: Mapping[str, Any] | None = None, reuse: bool = True,
               in_process: bool = True) -> dict[str, Path]:
    """Train one short run per method (same seed and data) and return their folders.

    Args:
        methods: built-in loss names.
        preset: ``"tiny"`` or ``"cpu"``.
        root: folder of the runs; each run's input config is saved as ``<root>/<method>.yaml``.
        epochs: epochs per run; defaults to the preset's.
        recorder: init_args of the recorder; defaults to :data:`DEFAULT_RECORDER`.
        overrides: dotted config changes applied to every run (see :func:`experiment_config`).
        reuse: skip a run whose folder already holds a finished recording made from the same
            config.
        in_process: train in this process (``dgpo.cli.main``); ``False`` runs
            ``python -m dgpo fit`` in a subprocess, its output in ``<root>/<method>.log``.

    Returns:
        The run folder of each method.

    Raises:
        subprocess.CalledProcessError: when a subprocess run fails.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for method in methods:
        config = experiment_config(method, preset, root, epochs, recorder, overrides)
        text = yaml.safe_dump(config, sort_keys=False)
        path = root / f"{method}.yaml"
        folder = run_dir(root, method)
        if reuse and _finished(folder) and path.is_file() and path.read_text() == text:
            print(f"{method}: reusing {folder}")
            folders[method] = folder
            continue
        path.write_text(text)
        for stale in (RECORDING, "gradient_weights.json", "metrics.csv"):
            (folder / stale).unlink(missing_ok=True)
        print(f"{method}: training ({preset}) into {folder}")
        if in_process:
            from dgpo.cli import main

            main(["fit", "--config", str(path)])
        else:
            with open(root / f"{method}.log", "w") as log:
                subprocess.run([sys.executable, "-m", "dgpo", "fit", "--config", str(path)],
                               check=True, stdout=log, stderr=subprocess.STDOUT)
        folders[method] = folder
    return folders


def _finished(folder: Path) -> bool:
    """Whether the folder holds the logs and the recording of a run that trained to the end."""
    if not (folder / "metrics.csv").is_file() or not (folder / RECORDING).is_file():
        return False
    from dgpo.analysis.load import read_meta

    return bool(read_meta(folder).get("finished"))


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
