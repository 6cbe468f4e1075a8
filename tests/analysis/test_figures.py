"""The plotting functions and their command lines, on recordings fed without training."""

import matplotlib
import numpy as np
import pandas as pd
import pytest

from dgpo.analysis import GradientWeightRecorder, dynamics, figure2, figure4, load_runs
from dgpo.analysis.figure4 import method_tokens, region_summary
from dgpo.losses import build_loss
from tests.analysis.conftest import feed

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    for name in ("grpo", "gppo", "dgpo"):
        feed(GradientWeightRecorder(tokens_per_step=24), root / name, steps=8,
             loss=build_loss(name))
        epochs = np.repeat(np.arange(4), 2)
        pd.DataFrame({"epoch": epochs, "step": np.arange(8),
                      "rollout/reward_mean": np.linspace(0.1, 0.5, 8),
                      "rollout/reward/accuracy": np.linspace(0.0, 0.4, 8),
                      "train/entropy": np.linspace(2.0, 1.0, 8),
                      "train/region/LN": np.full(8, 0.05),
                      "train/region/HP": np.full(8, 0.04)}).to_csv(root / name / "metrics.csv",
                                                                   index=False)
    return [root / name for name in ("grpo", "gppo", "dgpo")]


def test_method_tokens_uses_each_methods_own_run_else_its_counterfactual(recorded):
    runs = load_runs(recorded)
    panels = method_tokens(runs)
    assert [p.label for p in panels.values()] == ["GRPO", "GPPO", "DGPO"]
    tokens = runs[1].tokens
    np.testing.assert_allclose(panels["gppo"].weight,
                               tokens["prob_weight"].astype(float) * tokens["old_prob"])
    alone = method_tokens(runs[2:], ["grpo", "dgpo"], kind="prob")
    assert alone["grpo"].counterfactual and alone["grpo"].label == "GRPO (on DGPO's tokens)"
    np.testing.assert_array_equal(alone["grpo"].weight, runs[2].tokens["w_grpo"])


def test_region_summary_shares_and_weights(recorded):
    summary = region_summary(method_tokens(load_runs(recorded)))
    shares = summary["share"].groupby(level="method").sum()
    np.testing.assert_allclose(shares, 1.0)
    assert summary.loc[("GRPO", "LN"), "max"] == 0 and summary.loc[("GRPO", "HP"), "max"] == 0
    assert summary.loc[("GPPO", "LN"), "min"] > 1.0  # (1-ε)/r > 1 past the left boundary
    assert 0 < summary.loc[("DGPO", "LN"), "max"] < 1.0  # decayed below the inside value
    np.testing.assert_allclose(summary.xs("IN", level="region")["mean"], 1.0, rtol=1e-6)


def test_figure4_command_line_draws_all_panels(recorded, tmp_path, nonblank_png, capsys):
    out = tmp_path / "fig4.png"
    assert figure4.main([*map(str, recorded), "--out", str(out), "--max-points", "500"]) == 0
    nonblank_png(out)
    assert "LN" in capsys.readouterr().out


def test_figure2_command_line(tmp_path, nonblank_png):
    out = tmp_path / "fig2.png"
    assert figure2.main(["--out", str(out), "--old-prob", "0.3"]) == 0
    nonblank_png(out)


def test_dynamics_command_line_and_series(recorded, tmp_path, nonblank_png):
    out = tmp_path / "fig3.png"
    assert dynamics.main([*map(str, recorded), "--out", str(out)]) == 0
    nonblank_png(out)
    frame = pd.DataFrame({"val/math/avg@4": [0.1, 0.3], "val/gsm/avg@4": [0.3, 0.5],
                          "rollout/reward/accuracy": [0.0, 0.0]})
    pattern, series = dynamics.metric_series(frame, ("val/mean/avg@*", "val/*/avg@*"))
    assert pattern == "val/*/avg@*" and list(series) == [0.2, 0.4]
    with pytest.raises(ValueError, match="2 labels for 3 runs"):
        dynamics.plot_dynamics(recorded, labels=["a", "b"])
