"""The optimiser and its learning-rate schedule: AdamW, linear warm-up, constant or cosine."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn


def check_schedule(lr: float, weight_decay: float, warmup_steps: int, schedule: str,
                   min_lr_ratio: float) -> None:
    """Refuse optimiser settings out of range, naming the value and what is allowed.

    Raises:
        ValueError: for ``lr <= 0``, a negative ``weight_decay`` or ``warmup_steps``, an unknown
            ``schedule`` or ``min_lr_ratio`` outside [0, 1].
    """
    if isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    for name, value in (("weight_decay", weight_decay), ("warmup_steps", warmup_steps)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")


def lr_factor(step: int, warmup_steps: int, schedule: Literal["constant", "cosine"],
              total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate at optimiser step ``step`` (from 0), as a fraction of the peak rate.

    Linear warm-up over ``warmup_steps`` steps (``(step + 1) / warmup_steps``), then either the
    peak rate (``"constant"``) or a cosine decay that reaches ``min_lr_ratio`` at
    ``total_steps`` and stays there.

    Example:
        >>> [round(lr_factor(s, 2, "cosine", 6), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], lr: float,
                        betas: tuple[float, float], weight_decay: float, warmup_steps: int,
                        schedule: Literal["constant", "cosine"], total_steps: int,
                        min_lr_ratio: float = 0.0) -> dict:
    """AdamW and its per-step :func:`lr_factor` schedule, in Lightning's optimiser format."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, schedule=schedule,
                               total_steps=max(total_steps, 1), min_lr_ratio=min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip ``model``'s gradients to a global norm of ``max_norm`` (None: only measure it).

    The norm is over all parameters of all ranks: an FSDP1 root unit computes it over its
    shards, FSDP2 returns it as a DTensor (made a plain tensor here), and a plain or DDP module
    holds the full gradients.
    """
    limit = math.inf if max_norm is None else max_norm
    clip = getattr(model, "clip_grad_norm_", None)
    if clip is not None:  # FSDP1 (the policy is its own root unit)
        return clip(limit)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def non_finite_step(values: dict[str, torch.Tensor], skips_in_row: int, max_skipped: int,
                    where: str) -> int:
    """The number of non-finite steps in a row after this one (0: this step is fine).

    ``values`` (e.g. the step's loss and gradient norm) are global, the same on every rank, so
    every rank decides alike. A non-finite step is to be skipped, with a warning.

    Raises:
        RuntimeError: after more than ``max_skipped`` non-finite steps in a row, naming the
            offending values and ``where`` (the step and the epoch).

    Example:
        >>> non_finite_step({"train/loss": torch.tensor(0.5)}, 2, 3, "step 7")
        0
    """
    bad = {name: float(value) for name, value in values.items()
           if not bool(torch.isfinite(value).all())}
    if not bad:
        return 0
    skips_in_row += 1
    detail = ", ".join(f"{name} = {value}" for name, value in bad.items())
    if skips_in_row > max_skipped:
        raise RuntimeError(
            f"{detail} at {where}: {skips_in_row} non-finite steps in a row, more than "
            f"max_skipped_steps={max_skipped}; the run stops without updating the weights or "
            "writing a checkpoint of this step (lower model.lr, or check the reward and the data)")
    rank_zero_warn(f"skipping {where}: {detail} (no update; {skips_in_row} in a row)")
    return skips_in_row
