"""The DAPO preset end to end on the tiny config, with the other rollout and loss controls."""

import pandas as pd
import pytest
import yaml

from dgpo.cli import main
from tests.test_cli import REPO, run_dir, tiny_config


def test_dapo_preset_trains_with_dynamic_sampling_shaping_and_correction(
        tmp_path, tiny_model_path):
    config = tiny_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 2})
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({
        "rollout": {"max_draws": 3,
                    "advantage": {"class_path": "dgpo.advantages.ReinforcePlusPlusBaseline"}},
        "model": {"kl_coef": 0.05, "kl_estimator": "k2",
                  "rollout_correction": "sequence_mask", "correction_cap": 2.0}}))
    main(["fit", "--config", str(config), "--config",
          str(REPO / "configs" / "presets" / "dapo.yaml"), "--config", str(extra)])
    metrics = pd.read_csv(run_dir(tmp_path) / "metrics.csv").groupby("epoch").mean()
    assert list(metrics.index) == [0, 1]
    # a tiny random model rarely stops: a truncated response gets the full overlong penalty
    # (-1 at max_new_tokens) on top of the dense toy reward, one that stops early at most that
    shaped = metrics["rollout/reward_mean"] - metrics["rollout/reward_unshaped_mean"]
    assert (shaped <= -metrics["rollout/truncated_fraction"] + 1e-6).all()
    assert (shaped >= -1.0 - 1e-6).all()
    assert metrics["rollout/truncated_fraction"].max() > 0.9
    # dynamic sampling: at least one draw, at most max_draws; 4 groups trained on
    assert metrics["rollout/filter/draws"].between(1, 3).all()
    assert (metrics["rollout/filter/groups_kept"] + metrics["rollout/filter/filled_groups"]
            == 4).all()
    # the mismatch correction ran on every token (fp32 engine and trainer agree: weights ≈ 1)
    assert metrics["rollout/mismatch/weights/mean"].to_numpy() == pytest.approx([1.0, 1.0],
                                                                                abs=1e-3)
    assert "train/kl" in metrics and (metrics["train/kl_loss"] >= 0).all()
