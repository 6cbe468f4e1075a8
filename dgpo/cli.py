"""Command-line entry point: ``python -m dgpo fit|validate|test --config configs/<name>.yaml``."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dgpo.console import VERBOSE_HELP, quiet_console, split_verbose
from dgpo.data import RLVRDataModule
from dgpo.distributed import release_process_group
from dgpo.lora import export_merged
from dgpo.module import RLVRModule
from dgpo.progress import EpochSummary
from dgpo.rollout import RolloutCallback, RolloutEngine
from dgpo.runs import interrupted_exit, prepare_fit, reopen_run_logs
from dgpo.sweep import main as sweep_main

SUBCOMMANDS = ("fit", "validate", "test")
PROG = "dgpo"
DESCRIPTION = ("dgpo: reinforcement learning with verifiable rewards on LLMs (DGPO and peer "
               "losses). Also: `dgpo sweep --help` (losses x seeds with confidence intervals) and "
               "`dgpo export CKPT OUT_DIR` (a checkpoint as a Hugging Face folder).")


class DGPOCLI(LightningCLI):
    """LightningCLI for dgpo: the RLVR module and data module, the engine and the rollout.

    Two top-level sections besides ``model``, ``data`` and ``trainer``:

    - ``engine:`` the rollout engine (``class_path`` of a :class:`~dgpo.rollout.RolloutEngine`).
      Training rollouts and validation/test both use it: it is handed to the rollout callback
      and to the module, and the data module learns from it how many ranks an engine spans.
    - ``rollout:`` the :class:`~dgpo.rollout.RolloutCallback` (a forced callback), so that
      ``--rollout.n 4`` works on the command line; ``model.temperature`` follows
      ``rollout.temperature``.

    The data module receives the module's tokenizer explicitly.

    Subcommands: ``fit``, ``validate`` and ``test`` (Lightning's ``predict`` is not offered).
    Every trainer gets ``epoch_summary`` as its first callback.

    ``validate``/``test`` with ``--ckpt_path`` take only the weights from the
    checkpoint: the config and the command line say how to evaluate. (LightningCLI would
    otherwise parse the checkpoint's hyperparameters over them, silently replacing, e.g.,
    ``--model.evaluation.k`` with the training run's value.) ``fit --ckpt_path`` resumes with the
    checkpoint's hyperparameters, as LightningCLI does.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``engine`` and ``rollout`` sections and hand their objects to their users."""
        parser.add_subclass_arguments(RolloutEngine, "engine", required=True,
                                      help="The rollout engine (training and evaluation).")
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        parser.link_arguments("engine", "rollout.engine", apply_on="instantiate")
        parser.link_arguments("engine", "model.engine", apply_on="instantiate")
        parser.link_arguments("engine", "data.ranks_per_engine", apply_on="instantiate",
                              compute_fn=_ranks_per_engine)
        parser.link_arguments("rollout.temperature", "model.temperature")
        parser.link_arguments("model", "data.tokenizer", apply_on="instantiate",
                              compute_fn=_tokenizer)
    def __init__(self, *args: Any, epoch_summary: EpochSummary, **kwargs: Any) -> None:
        self.epoch_summary = epoch_summary
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands that dgpo implements, with the arguments each skips."""
        lightning = LightningCLI.subcommands()
        return {name: lightning[name] for name in SUBCOMMANDS}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with the epoch summary before every other callback."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.insert(0, self.epoch_summary)
        return trainer

    def instantiate_classes(self) -> None:
        """Build the objects; a bad value's own message comes first (see :func:`reason_first`)."""
        try:
            super().instantiate_classes()
        except ValueError as error:  # a class refused its arguments: a configuration error
            raise ConfigError(reason_first(error) or str(error)) from error

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") == "fit":  # run folder, `--ckpt_path last` (dgpo.runs)
            prepare_fit(self.config["fit"])
        if self.config.get("subcommand") in (None, "fit"):
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """A resumed run continues its folder's logs (:func:`dgpo.runs.reopen_run_logs`)."""
        reopen_run_logs(self.trainer, self.config_init["fit"]["ckpt_path"])

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as error:  # SIGTERM/SIGINT: a non-zero exit (dgpo.runs)
            raise interrupted_exit(getattr(self, "trainer", None), error) from None


class ConfigError(ValueError):
    """A configuration value that cannot work, its reason first (the command line exits 2)."""


def reason_first(error: ValueError) -> str | None:
    r"""The message of a jsonargparse Union failure with the real reason on its first line.

    A bad value for a ``PolicyLoss | str | None`` argument (``--model.loss.init_args.clip_low
    2``) fails every branch of the Union, and jsonargparse's message opens with "Does not
    validate against any of the Union subtypes", the class's own error further down. This puts
    the errors that are not mere type mismatches first; ``None`` for any other error.

    Example:
        >>> reason_first(ValueError("Does not validate against any of the Union subtypes\n"
        ...     "Errors:\n  - clip_low must be in (0.0, 1.0), got 2.0\n"
        ...     "  - Expected a <class 'str'>")).splitlines()[0]
        'clip_low must be in (0.0, 1.0), got 2.0'
    """
    text = str(error)
    if not text.startswith("Does not validate against any of the Union subtypes"):
        return None
    reasons = [line.strip()[2:] for line in text.splitlines()
               if line.strip().startswith("- ") and not line.strip().startswith("- Expected a")]
    if not reasons:
        return None
    return "\n".join([*reasons, "", f"(jsonargparse: {text})"])


def export_main(argv: list[str]) -> int:
    """``dgpo export CKPT OUT_DIR``: a checkpoint's policy as a Hugging Face folder.

    A LoRA checkpoint is merged into its base model (:func:`dgpo.lora.export_merged`).
    """
    parser = argparse.ArgumentParser(prog=f"{PROG} export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a dgpo checkpoint (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="the folder to write (config, weights, tokenizer)")
    options = parser.parse_args(argv)
    print(export_merged(options.checkpoint, options.out_dir))
    return 0


def _ranks_per_engine(engine: RolloutEngine) -> Any:
    return engine.ranks_per_engine


def _tokenizer(module: RLVRModule) -> Any:
    return module.tokenizer


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DGPOCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``).

    Environment variables for an in-process vLLM engine on CPU are set here, and only here,
    unless the caller already set them. The console is quiet (see :mod:`dgpo.console`) unless
    ``--verbose`` is among the arguments or ``DGPO_VERBOSE=1``. The process group of a
    multi-process run is released at exit (:func:`dgpo.distributed.release_process_group`).
    """
    atexit.unregister(release_process_group)  # once, however often main runs in a process
    atexit.register(release_process_group)  # gloo's threads end before the interpreter does
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["sweep"]:  # `dgpo sweep ...`: dgpo.sweep
        sys.exit(sweep_main(argv[1:]))
    if isinstance(argv, list) and argv[:1] == ["export"]:  # `dgpo export CKPT OUT_DIR`
        sys.exit(export_main(argv[1:]))
    command_line = args is None
    if args is None:  # drop --verbose from sys.argv, which LightningCLI then reads
        verbose, rest = split_verbose(sys.argv[1:])
        sys.argv[1:] = rest
    else:
        verbose, args = split_verbose(args)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _cli(args, run, verbose)
    except ConfigError as error:  # on the command line: the reason, like a parse error
        if not command_line:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _cli(args: list[str] | dict[str, Any] | None, run: bool, verbose: bool) -> DGPOCLI:
    return DGPOCLI(
        RLVRModule,
        RLVRDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={"plugins": [{"class_path": "dgpo.checkpoint.AtomicCheckpointIO"}],
                          # the rollout buffer shards each mini-batch over the ranks itself
                          "use_distributed_sampler": False,
                          "enable_model_summary": verbose},
        parser_kwargs={"prog": PROG, "description": DESCRIPTION, "epilog": VERBOSE_HELP},
        args=args,
        run=run,
        epoch_summary=EpochSummary(None if verbose else quiet_console()),
    )
