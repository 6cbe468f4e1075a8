"""Record the gradient weights of real training tokens (the data behind the paper's Figure 4)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dgpo.analysis.reservoir import Reservoir
from dgpo.analysis.schema import COLUMNS, METHOD_PREFIX, RECORDING
from dgpo.analysis.weights import comparison_losses, method_name
from dgpo.losses import REGION_NAMES, PolicyLoss, regions


class GradientWeightRecorder(Callback):
    """Records, per optimiser step, a random subsample of valid tokens and their gradient weights.

    For each recorded token: step, epoch, mini-batch, the IS ratio, π, π_old, the advantage, the
    region, the weight ``W`` on ``∇π`` the trained loss applied (``prob_weight``), ``g = W·π``, and
    ``w_<method>``, the weight every built-in method would have applied to the same token (built
    by :func:`~dgpo.analysis.weights.comparison_losses`: defaults, the trained loss's clip widths;
    the trained loss's own method is the trained loss itself). See
    :data:`dgpo.analysis.schema.COLUMNS`.

    Size is bounded twice: at most ``tokens_per_step`` tokens are drawn uniformly from each
    mini-batch, and at most ``max_rows`` rows are kept over the run, a uniform sample of all drawn
    tokens (reservoir sampling), so early and late steps are represented alike. With the seven
    built-in methods a row takes 93 bytes in memory and about 70 in the Parquet file (7 MB for
    the default ``max_rows``).

    The file, ``<dirpath>/<filename>`` (Parquet; ``dirpath`` defaults to ``trainer.log_dir``, the
    run's folder with ``metrics.csv`` and LightningCLI's ``config.yaml``), is rewritten at the end
    of every epoch, so an interrupted run keeps what it recorded (its metadata says
    ``"finished": false`` until training ends). Beside it, ``<stem>.json`` holds
    the metadata (also in the Parquet schema under the key ``dgpo``): trained loss and compared
    methods with their hyper-parameters, the module's hyper-parameters, settings, counts, the
    column descriptions and the name of the run's config file when there is one.

    Recording has no effect on training: it reads the detached tensors ``training_step`` returns,
    after the optimiser step, and draws its samples from its own NumPy generator, never from
    torch's or NumPy's global state. Only global rank 0 records (its own mini-batches).

    Args:
        tokens_per_step: the most tokens recorded per optimiser step, ≥ 1.
        max_rows: the most rows kept in the file, ≥ 1.
        methods: built-in methods whose weights are recorded as ``w_<name>``; defaults to all.
        filename: name of the Parquet file.
        dirpath: folder of the file; defaults to ``trainer.log_dir``.
        seed: seed of the recorder's own generator.

    Raises:
        ValueError: for a bad setting, an unknown method, or (at ``setup``) a module without a
            :class:`~dgpo.losses.PolicyLoss` in ``loss_fn``.

    Example:
        >>> recorder = GradientWeightRecorder(tokens_per_step=256, max_rows=50_000)
        >>> trainer = Trainer(callbacks=[rollout, recorder])  # doctest: +SKIP
    """

    def __init__(self, tokens_per_step: int = 256, max_rows: int = 100_000,
                 methods: Sequence[str] | None = None,
                 filename: str = RECORDING, dirpath: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        for name, value in (("tokens_per_step", tokens_per_step), ("max_rows", max_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not filename.endswith(".parquet"):
            raise ValueError(f"filename must end with '.parquet', got {filename!r}")
        comparison_losses(None, methods)  # fail early on an unknown method name
        self.tokens_per_step = tokens_per_step
        self.max_rows = max_rows
        self.methods = None if methods is None else list(methods)
        self.filename = filename
        self.dirpath = dirpath
        self.seed = seed
        self.path: Path | None = None
        self._loss: PolicyLoss | None = None
        self._losses: dict[str, PolicyLoss] = {}
        self._rng = np.random.default_rng(seed)
        self._reservoir = Reservoir(max_rows, self._rng)
        self._steps = 0
        self._valid_tokens = 0

    # ----------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._start(pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero and isinstance(outputs, Mapping) and "ratio" in outputs:
            self._record(trainer, outputs, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module, finished=True)
            rank_zero_info(f"GradientWeightRecorder: {len(self._reservoir)} tokens of "
                           f"{self._valid_tokens} in {self.path}")

    # ------------------------------------------------------------------------------- recording
    def _start(self, pl_module: LightningModule) -> None:
        loss = getattr(pl_module, "loss_fn", None)
        if not isinstance(loss, PolicyLoss):
            raise ValueError("GradientWeightRecorder needs a module whose `loss_fn` is a "
                             f"dgpo.losses.PolicyLoss, got {type(loss).__name__}")
        self._loss = loss
        self._losses = comparison_losses(loss, self.methods)
        self._rng = np.random.default_rng(self.seed)
        self._reservoir = Reservoir(self.max_rows, self._rng)
        self._steps = self._valid_tokens = 0

    def _record(self, trainer: Trainer, outputs: Mapping[str, Any], batch_idx: int) -> None:
        assert self._loss is not None, "setup('fit') has not run"
        rows, positions = outputs["mask"].bool().nonzero(as_tuple=True)
        total = rows.numel()
        self._steps += 1
        self._valid_tokens += total
        if total == 0:
            return
        pick = np.sort(self._rng.choice(total, size=min(self.tokens_per_step, total),
                                        replace=False))
        index = torch.from_numpy(pick).to(rows.device)
        rows, positions = rows[index], positions[index]

        def take(key: str) -> torch.Tensor:
            value = outputs.get(key)
            if value is None:
                return torch.full((len(pick),), math.nan)
            return value[rows, positions].detach().float().cpu()

        ratio, logp, old_logp = take("ratio"), take("logp"), take("old_logp")
        advantages, weight = take("advantages"), take("prob_weight")
        prob, old_prob = logp.exp(), old_logp.exp()
        code = regions(ratio, advantages, self._loss.clip_low, self._loss.clip_high)
        batch: dict[str, np.ndarray] = {
            "step": np.full(len(pick), trainer.global_step - 1, dtype=np.int64),
            "epoch": np.full(len(pick), trainer.current_epoch, dtype=np.int32),
            "batch_idx": np.full(len(pick), batch_idx, dtype=np.int32),
            "sequence": rows.cpu().numpy().astype(np.int32),
            "position": positions.cpu().numpy().astype(np.int32),
            "advantage": advantages.numpy(), "ratio": ratio.numpy(), "logp": logp.numpy(),
            "old_logp": old_logp.numpy(), "prob": prob.numpy(), "old_prob": old_prob.numpy(),
            "entropy": take("entropy").numpy(), "region": code.numpy().astype(np.int8),
            "prob_weight": weight.numpy(), "grad_weight": (weight * prob).numpy(),
        }
        for name, loss in self._losses.items():
            batch[METHOD_PREFIX + name] = loss.prob_weight(ratio, old_prob, advantages).numpy()
        self._reservoir.add(batch)

    # --------------------------------------------------------------------------------- writing
    def _write(self, trainer: Trainer, pl_module: LightningModule, finished: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not len(self._reservoir):
            return
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.filename
        columns = self._reservoir.columns()
        order = np.lexsort((columns["position"], columns["sequence"], columns["step"]))
        names = np.asarray(REGION_NAMES, dtype=object)
        arrays = {name: (names[column[order]] if name == "region" else column[order])
                  for name, column in columns.items()}
        table = pa.table({name: (pa.array(value).dictionary_encode() if name == "region"
                                 else pa.array(value)) for name, value in arrays.items()})
        meta = self._metadata(pl_module, folder, len(order), finished)
        table = table.replace_schema_metadata({"dgpo": json.dumps(meta, default=str)})
        partial = self.path.with_name(self.path.name + ".partial")
        pq.write_table(table, partial)
        os.replace(partial, self.path)
        self.path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

    def _metadata(self, pl_module: LightningModule, folder: Path, rows: int,
                  finished: bool) -> dict[str, Any]:
        assert self._loss is not None
        columns = dict(COLUMNS)
        columns.update({METHOD_PREFIX + name: f"W on grad(pi) that {name} would have applied"
                        for name in self._losses})
        config = folder / "config.yaml"
        return {
            "format": 1,
            "method": method_name(self._loss),
            "loss": _describe(self._loss),
            "methods": {name: _describe(loss) for name, loss in self._losses.items()},
            "clip_low": self._loss.clip_low,
            "clip_high": self._loss.clip_high,
            "tokens_per_step": self.tokens_per_step,
            "max_rows": self.max_rows,
            "seed": self.seed,
            "finished": finished,
            "rows": rows,
            "steps": self._steps,
            "tokens_drawn": self._reservoir.seen,
            "valid_tokens": self._valid_tokens,
            "config": config.name if config.is_file() else None,
            "module_hparams": dict(getattr(pl_module, "hparams", {})),
            "columns": columns,
        }


def _describe(loss: PolicyLoss) -> dict[str, Any]:
    cls = type(loss)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(vars(loss))}
