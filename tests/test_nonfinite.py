"""Non-finite losses never reach the weights: the step is skipped, counted, and a streak stops."""

import pandas as pd
import pytest
import torch

from dgpo.cli import main
from tests.test_cli import run_dir, tiny_config


def _config(tmp_path, model_path, nan_steps, epochs=2, max_skipped=3):
    return tiny_config(tmp_path, model_path, **{
        "trainer.max_epochs": epochs,
        "trainer.callbacks": [{"class_path": "tests.plugins.CountSteps"},
                              {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"save_last": True}}],
        "model.loss": {"class_path": "tests.plugins.NonFiniteLoss",
                       "init_args": {"nan_steps": nan_steps}},
        "model.max_skipped_steps": max_skipped})


def test_nan_step_is_skipped_counted_and_the_weights_stay_finite(tmp_path, tiny_model_path):
    # tiny_config trains 4 optimiser steps per epoch (16 sequences, mini-batches of 4)
    main(["fit", "--config", str(_config(tmp_path, tiny_model_path, nan_steps=[1]))])
    metrics = pd.read_csv(run_dir(tmp_path) / "metrics.csv")
    skipped = metrics.dropna(subset=["train/skipped_steps"])["train/skipped_steps"].tolist()
    assert skipped == [1.0, 0.0]  # epoch 0 skipped its step 1, epoch 1 none
    state = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


def test_a_streak_of_nan_steps_stops_the_run_naming_metric_step_and_epoch(tmp_path,
                                                                        tiny_model_path):
    config = _config(tmp_path, tiny_model_path, nan_steps=list(range(4, 100)), epochs=4,
                     max_skipped=2)
    with pytest.raises(RuntimeError, match=r"^train/loss = nan.* at optimiser step \d+ \(epoch \d"
                                           r".*3 non-finite steps in a row, more than "
                                           r"max_skipped_steps=2"):
        main(["fit", "--config", str(config)])
    # the last checkpoint is epoch 0's (steps 0-3 were fine), never one with the bad steps
    state = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
