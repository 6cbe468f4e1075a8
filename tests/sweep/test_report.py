import math
from pathlib import Path

import pandas as pd
import pytest

from dgpo.sweep.cli import write_report
from dgpo.sweep.collect import epoch_table, run_metrics
from dgpo.sweep.report import fmt
from tests.sweep.fabricated import fabricate

T_975_DF2 = 4.302652729749462  # Student t 97.5% quantile, 2 degrees of freedom

# reward per epoch; the last 3 epochs average to 0.3, 0.4, 0.5 (grpo) and 0.4, 0.6, 0.5 (dgpo)
CURVES = {
    "grpo": {0: [0.0, 0.2, 0.3, 0.4], 1: [0.1, 0.3, 0.4, 0.5], 2: [0.2, 0.4, 0.5, 0.6]},
    "dgpo": {0: [0.0, 0.3, 0.4, 0.5], 1: [0.1, 0.5, 0.6, 0.7], 2: [0.2, 0.4, 0.5, 0.6]},
}


def _row(summary: pd.DataFrame, method: str, metric: str) -> pd.Series:
    return summary[(summary["method"] == method) & (summary["metric"] == metric)].iloc[0]


def test_write_report_summary_numbers(tmp_path: Path):
    fabricate(tmp_path, CURVES, extra={"val/math6/avg@4": [0.1, 0.2, 0.3, 0.4],
                                       "val/math6/pass@4": [0.5, 0.5, 0.6, 0.7]})
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["summary.csv", "report.md", "curves.png"]
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == ["method", "metric", "seeds", "mean", "std", "ci_low",
                                     "ci_high"]
    row = _row(summary, "dgpo", "final_reward")
    # per seed: 0.4, 0.6, 0.5 -> mean 0.5, sd 0.1
    assert (row["seeds"], row["mean"], row["std"]) == (3, pytest.approx(0.5), pytest.approx(0.1))
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    assert _row(summary, "grpo", "final_accuracy")["mean"] == pytest.approx(0.2)  # reward / 2
    assert _row(summary, "grpo", "best_epoch")["mean"] == 3
    # grpo's mean reward over all epochs: (0.225 + 0.325 + 0.425) / 3
    assert _row(summary, "grpo", "reward_auc")["mean"] == pytest.approx(0.325)
    assert _row(summary, "grpo", "final_entropy")["mean"] == pytest.approx(0.8)  # 1 - .1 * 2
    assert _row(summary, "grpo", "response_length")["mean"] == pytest.approx(12.0)
    assert _row(summary, "grpo", "ln_fraction")["mean"] == pytest.approx(0.01)  # seeds 0, .01, .02
    assert _row(summary, "grpo", "hp_fraction")["std"] == 0.0
    assert _row(summary, "grpo", "wall_seconds")["mean"] == 60.0
    assert _row(summary, "grpo", "val/math6/avg@4")["mean"] == pytest.approx(0.4)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_markdown_compares_with_baseline(tmp_path: Path):
    fabricate(tmp_path, CURVES)
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Command: `python -m dgpo sweep --fabricated`" in text
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert f"| dgpo | 3 | 0.500 ± {half:.3f} |" in text
    # paired final reward differences (dgpo - grpo): 0.1, 0.2, 0.0 -> mean 0.1, sd 0.1;
    # P(dgpo > grpo) over the 9 pairs of (0.4, 0.6, 0.5) vs (0.3, 0.4, 0.5): 0.4 wins 1 and
    # ties 1, 0.6 wins 3, 0.5 wins 2 and ties 1: (1.5 + 3 + 2.5) / 9 = 0.778
    lo, hi = 0.1 - half, 0.1 + half
    assert f"| dgpo | final reward | 3 | 0.100 | [{lo:.3f}, {hi:.3f}] | 0.778 | no |" in text
    # methods in the order of --losses
    assert text.index("| grpo | 3 |") < text.index("| dgpo | 3 |")
    assert "last 3 epochs" in text
    assert "## Difference from `grpo`" in text


def test_write_report_lists_failed_and_unfinished_runs(tmp_path: Path):
    runs = fabricate(tmp_path, CURVES)
    (Path(runs[0].run_dir) / "status.json").write_text('{"state": "failed", "returncode": 1}')
    (Path(runs[1].run_dir) / "status.json").unlink()
    write_report(tmp_path, baseline="dgpo")
    text = (tmp_path / "report.md").read_text()
    assert "Failed runs (not in the tables): grpo-s0" in text
    assert "Unfinished runs (not in the tables): grpo-s1" in text
    assert "## Difference from `dgpo`" in text
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert _row(summary, "grpo", "final_reward")["seeds"] == 1
    assert math.isnan(_row(summary, "grpo", "final_reward")["ci_low"])


def test_write_report_rejects_unknown_baseline(tmp_path: Path):
    fabricate(tmp_path, CURVES)
    with pytest.raises(ValueError, match="--baseline 'cispo'"):
        write_report(tmp_path, baseline="cispo")
    with pytest.raises(ValueError, match="no sweep.json"):
        write_report(tmp_path / "runs")


def test_epoch_table_joins_resumed_attempts(tmp_path: Path):
    pd.DataFrame({"epoch": [0, 1, 2], "rollout/reward_mean": [0.1, 0.2, 0.9]}).to_csv(
        tmp_path / "metrics-attempt0.csv", index=False)
    # resumed from the epoch-1 checkpoint: epoch 2 is logged again and wins
    pd.DataFrame({"epoch": [2, 2, 3], "rollout/reward_mean": [0.3, None, 0.4],
                  "val/x/avg@2": [None, 0.5, None]}).to_csv(tmp_path / "metrics.csv", index=False)
    table = epoch_table(tmp_path)
    assert table["rollout/reward_mean"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert table.loc[2, "val/x/avg@2"] == 0.5
    metrics = run_metrics(table, wall_seconds=None)
    assert metrics["final_reward"] == pytest.approx(0.3)  # epochs 1-3
    assert metrics["best_epoch"] == 3
    assert metrics["val/x/avg@2"] == 0.5
    assert math.isnan(metrics["final_entropy"]) and math.isnan(metrics["wall_seconds"])


def test_write_report_before_any_run_finished(tmp_path: Path):
    runs = fabricate(tmp_path, CURVES)
    for run in runs:
        (Path(run.run_dir) / "status.json").write_text('{"state": "running", "attempts": 1}')
    write_report(tmp_path)
    assert (tmp_path / "summary.csv").read_text().strip() == (
        "method,metric,seeds,mean,std,ci_low,ci_high")
    text = (tmp_path / "report.md").read_text()
    assert "- runs: 0 finished, 0 failed, 6 not finished" in text
    assert "No comparison: `grpo` has no finished run" in text


@pytest.mark.parametrize(("value", "text"), [(-0.0001, "0.000"), (-0.0004, "0.000"),
                                             (-0.0006, "-0.001"), (0.25, "0.250"),
                                             (-12.345, "-12.35"), (1234.5, "1234"),
                                             (-0.004, "-0.004"), (float("nan"), "–")])
def test_fmt_rounds_and_never_prints_negative_zero(value: float, text: str):
    assert fmt(value) == text


def test_run_metrics_leave_out_the_mean_over_a_single_benchmark():
    one = pd.DataFrame({"rollout/reward_mean": [0.1, 0.2],
                        "val/held_out/avg@4": [float("nan"), 0.3],
                        "val/mean/avg@4": [float("nan"), 0.3]})
    assert "val/mean/avg@4" not in run_metrics(one, None)
    assert run_metrics(one, None)["val/held_out/avg@4"] == 0.3
    two = one.assign(**{"val/other/avg@4": [float("nan"), 0.5], "val/mean/avg@4": [None, 0.4]})
    assert run_metrics(two, None)["val/mean/avg@4"] == 0.4
