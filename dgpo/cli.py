"""Command-line entry point: ``python -m dgpo fit|validate|test --config configs/<name>.yaml``."""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from dgpo.console import VERBOSE_HELP, quiet_console, split_verbose
from dgpo.data import RLVRDataModule
from dgpo.module import RLVRModule
from dgpo.progress import EpochSummary

SUBCOMMANDS = ("fit", "validate", "test")
DESCRIPTION = "dgpo: reinforcement learning with verifiable rewards on LLMs (DGPO and peer losses)"


class DGPOCLI(LightningCLI):
    """LightningCLI for dgpo: the RLVR module and data module, seeds and config saving.

    Subcommands: ``fit``, ``validate`` and ``test`` (Lightning's ``predict`` is not offered).
    Every trainer gets ``epoch_summary`` as its first callback.

    ``validate``/``test`` with ``--ckpt_path`` take only the weights from the
    checkpoint: the config and the command line say how to evaluate. (LightningCLI would
    otherwise parse the checkpoint's hyperparameters over them, silently replacing, e.g.,
    ``--model.evaluation.k`` with the training run's value.) ``fit --ckpt_path`` resumes with the
    checkpoint's hyperparameters, as LightningCLI does.
    """

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

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") in (None, "fit"):
            super()._parse_ckpt_path()


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DGPOCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``).

    Environment variables for an in-process vLLM engine on CPU are set here, and only here,
    unless the caller already set them. The console is quiet (see :mod:`dgpo.console`) unless
    ``--verbose`` is among the arguments or ``DGPO_VERBOSE=1``.
    """
    if args is None:  # drop --verbose from sys.argv, which LightningCLI then reads
        verbose, rest = split_verbose(sys.argv[1:])
        sys.argv[1:] = rest
    else:
        verbose, args = split_verbose(args)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        parser_kwargs={"prog": "dgpo", "description": DESCRIPTION, "epilog": VERBOSE_HELP},
        args=args,
        run=run,
        epoch_summary=EpochSummary(None if verbose else quiet_console()),
    )
