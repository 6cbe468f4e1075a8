"""Command-line entry point: ``python -m dgpo fit|validate|test --config configs/<name>.yaml``."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dgpo.data import RLVRDataModule
from dgpo.module import RLVRModule
from dgpo.rollout import RolloutCallback, RolloutEngine


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

    ``validate``/``test``/``predict`` with ``--ckpt_path`` take only the weights from the
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

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") in (None, "fit"):
            super()._parse_ckpt_path()


def _ranks_per_engine(engine: RolloutEngine) -> Any:
    return engine.ranks_per_engine


def _tokenizer(module: RLVRModule) -> Any:
    return module.tokenizer


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DGPOCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``).

    Environment variables for an in-process vLLM engine on CPU are set here, and only here,
    unless the caller already set them.
    """
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
