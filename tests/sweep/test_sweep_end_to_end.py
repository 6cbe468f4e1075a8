"""A real sweep: 2 losses x 2 seeds x 2 epochs of `dgpo fit` on the tiny config."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_tiny_writes_outputs_and_seeds_differ(tmp_path: Path):
    out = tmp_path / "sweep"
    # this checkout's dgpo in the runs too; one thread per run, as two run at once
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dgpo", "sweep", "--config", "configs/tiny.yaml",
         "--losses", "grpo", "configs/losses/dgpo.yaml", "--seeds", "0", "1", "--out", str(out),
         "--set", "trainer.max_epochs=2", "--parallel", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [line.split(" ")[0] for line in progress] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]

    summary = pd.read_csv(out / "summary.csv")
    rewards = summary[summary["metric"] == "final_reward"].set_index("method")
    assert rewards.loc[["grpo", "dgpo"], "seeds"].tolist() == [2, 2]
    assert {"final_entropy", "ln_fraction", "hp_fraction", "wall_seconds"} <= set(summary["metric"])
    report = (out / "report.md").read_text()
    assert "## Difference from `grpo`" in report and "| dgpo | final reward | 2 |" in report
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    for loss in ("grpo", "dgpo"):
        runs = [out / "runs" / f"{loss}-s{seed}" for seed in (0, 1)]
        for seed, run in enumerate(runs):
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["seed_everything"] == seed
            assert (run / "checkpoints" / "last.ckpt").is_file()
            assert pd.read_csv(run / "metrics.csv")["epoch"].max() == 1
        completions = [(run / "completions.jsonl").read_text() for run in runs]
        assert completions[0] != completions[1], f"{loss}: seeds 0 and 1 sampled the same"
