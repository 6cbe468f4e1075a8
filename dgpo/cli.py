"""Command-line entry point: ``python -m dgpo fit|validate|test --config configs/<name>.yaml``."""

from __future__ import annotations

import atexit
import os
from typing import Any

from lightning.pytorch.cli import LightningCLI

from dgpo.data import RLVRDataModule
from dgpo.distributed import release_process_group
from dgpo.module import RLVRModule
from dgpo.runs import interrupted_exit, prepare_fit, reopen_run_logs


class DGPOCLI(LightningCLI):
    """LightningCLI for dgpo: the RLVR module and data module, seeds and config saving.

    ``validate``/``test``/``predict`` with ``--ckpt_path`` take only the weights from the
    checkpoint: the config and the command line say how to evaluate. (LightningCLI would
    otherwise parse the checkpoint's hyperparameters over them, silently replacing, e.g.,
    ``--model.evaluation.k`` with the training run's value.) ``fit --ckpt_path`` resumes with the
    checkpoint's hyperparameters, as LightningCLI does.
    """

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


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DGPOCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``).

    Environment variables for an in-process vLLM engine on CPU are set here, and only here,
    unless the caller already set them. The process group of a multi-process run is released at
    exit (:func:`dgpo.distributed.release_process_group`).
    """
    atexit.unregister(release_process_group)  # once, however often main runs in a process
    atexit.register(release_process_group)  # gloo's threads end before the interpreter does
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
                          "use_distributed_sampler": False},
        args=args,
        run=run,
    )
