"""Helpers of the analysis tests: a non-blank PNG check and a recorder fed without training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dgpo.analysis import GradientWeightRecorder
from dgpo.losses import DGPOLoss, PolicyLoss


def assert_nonblank_png(path: Path, min_bytes: int = 10_000) -> None:
    """The file is a PNG with real content: not tiny, not one colour, not mostly empty."""
    from matplotlib.image import imread

    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    image = imread(path)[..., :3]
    inked = (image < 0.9).any(axis=-1).mean()
    assert image.std() > 0.05, f"{path} is nearly one colour"
    assert inked > 0.02, f"{path} is nearly blank ({inked:.1%} of pixels drawn)"


def fake_outputs(seed: int, batch: int = 4, length: int = 12,
                 loss: PolicyLoss | None = None) -> dict[str, torch.Tensor | None]:
    """What RLVRModule.training_step returns, for random tokens (ratios well past both edges)."""
    generator = torch.Generator().manual_seed(seed)
    loss = loss or DGPOLoss()
    mask = torch.rand(batch, length, generator=generator) > 0.3
    old_logp = -torch.rand(batch, length, generator=generator) * 6
    logp = old_logp + torch.randn(batch, length, generator=generator) * 0.5
    advantages = torch.randn(batch, generator=generator)[:, None].expand(batch, length)
    out = loss(logp, old_logp, advantages, mask)
    return {"loss": out.loss, "mask": mask, "advantages": advantages * mask,
            "old_logp": old_logp, "ratio": out.ratio * mask, "logp": logp * mask,
            "entropy": torch.rand(batch, length, generator=generator) * mask,
            "prob_weight": out.prob_weight * mask}


def feed(recorder: GradientWeightRecorder, folder: Path, steps: int,
         loss: PolicyLoss | None = None, steps_per_epoch: int = 4) -> list[dict]:
    """Drive the recorder's hooks like a fit of ``steps`` optimiser steps; return the outputs."""
    loss = loss or DGPOLoss()
    module = SimpleNamespace(loss_fn=loss, hparams={"lr": 1e-3})
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, current_epoch=0,
                              log_dir=str(folder), default_root_dir=str(folder))
    recorder.setup(trainer, module, "fit")
    outputs = []
    for step in range(steps):
        trainer.global_step = step + 1
        trainer.current_epoch = step // steps_per_epoch
        outputs.append(fake_outputs(step, loss=loss))
        recorder.on_train_batch_end(trainer, module, outputs[-1], None, step % steps_per_epoch)
        if (step + 1) % steps_per_epoch == 0:
            recorder.on_train_epoch_end(trainer, module)
    recorder.on_train_end(trainer, module)
    return outputs


@pytest.fixture
def nonblank_png():
    return assert_nonblank_png
