from pathlib import Path

import pandas as pd
import pytest

from dgpo.cli import main as dgpo_main
from dgpo.sweep.cli import main

SWEEP = ["--config", "configs/tiny.yaml", "--losses", "grpo", "dgpo", "--seeds", "0", "1",
         "--set", "trainer.max_epochs=2"]


def _calls(out: Path, run_id: str) -> list[str]:
    return (out / "runs" / run_id / "calls.txt").read_text().splitlines()


def test_sweep_failure_exits_nonzero_then_resumes(tmp_path: Path, fake_python: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture):
    out = tmp_path / "sw"
    monkeypatch.setenv("FAKE_FAIL", "dgpo-s1")
    assert main([*SWEEP, "--out", str(out)], python=fake_python) == 1
    captured = capsys.readouterr()
    log = out.resolve() / "runs" / "dgpo-s1" / "log.txt"
    assert f"FAILED: dgpo-s1 exit 3, log {log}" in captured.err
    assert "Failed runs (not in the tables): dgpo-s1" in (out / "report.md").read_text()
    summary = pd.read_csv(out / "summary.csv")
    seeds = summary[summary["metric"] == "final_reward"].set_index("method")["seeds"]
    assert seeds.to_dict() == {"grpo": 2, "dgpo": 1}

    monkeypatch.delenv("FAKE_FAIL")
    assert main([*SWEEP, "--out", str(out)], python=fake_python) == 0
    captured = capsys.readouterr()
    assert "3 of 4 runs already finished; skipping them" in captured.out
    assert "[1/1] dgpo-s1: done" in captured.out
    assert len(_calls(out, "grpo-s0")) == 1
    ckpt = out.resolve() / "runs" / "dgpo-s1" / "checkpoints" / "last.ckpt"
    assert _calls(out, "dgpo-s1")[1].endswith(f"--ckpt_path {ckpt}")
    summary = pd.read_csv(out / "summary.csv")
    assert summary[summary["metric"] == "final_reward"]["seeds"].tolist() == [2, 2]


def test_sweep_report_rebuilds_outputs(tmp_path: Path, fake_python: str):
    out = tmp_path / "sw"
    assert main([*SWEEP, "--out", str(out), "--baseline", "dgpo"], python=fake_python) == 0
    for name in ("summary.csv", "report.md", "curves.png"):
        (out / name).unlink()
    assert main(["--report", str(out)]) == 0
    assert "## Difference from `dgpo`" in (out / "report.md").read_text()  # from sweep.json
    assert main(["--report", str(out), "--baseline", "grpo"]) == 0
    assert "## Difference from `grpo`" in (out / "report.md").read_text()
    assert (out / "summary.csv").is_file() and (out / "curves.png").is_file()


def test_sweep_grid_compares_at_the_same_grid_point(tmp_path: Path, fake_python: str):
    out = tmp_path / "sw"
    assert main([*SWEEP, "--out", str(out), "--grid", "model.lr=1e-5,2e-5"],
                python=fake_python) == 0
    assert len(list((out / "runs").glob("*/status.json"))) == 8
    assert "--model.lr=2e-5" in _calls(out, "dgpo+model.lr=2e-5-s1")[0]
    report = (out / "report.md").read_text()
    # the fake fit logs the same reward everywhere: differences of 0 over 2 seeds, P = 1/2
    for lr in ("1e-5", "2e-5"):
        assert (f"| dgpo model.lr={lr} | final reward | 2 | 0.000 | [0.000, 0.000] | 0.500 | no |"
                in report)
    assert "compared with `grpo` at the same grid point" in report


def test_sweep_dry_run_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "sw"
    assert main([*SWEEP, "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(" -m dgpo fit --config " in line for line in lines)
    assert "--model.loss dgpo --seed_everything 1 --trainer.max_epochs=2" in lines[3]
    assert not out.exists()


def test_sweep_slurm_writes_array_of_unfinished_runs(tmp_path: Path, fake_python: str,
                                                     capsys: pytest.CaptureFixture):
    out = tmp_path / "sw"
    run_dir = out / "runs" / "grpo-s0"
    # plan the sweep and finish one run alone with --run, as an array task would
    assert main([*SWEEP, "--out", str(out), "--slurm", "--slurm-no-submit",
                 "--slurm-partition", "cpu", "--parallel", "2"], python=fake_python) == 0
    assert main(["--run", str(run_dir)], python=fake_python) == 0
    assert len(_calls(out, "grpo-s0")) == 1
    assert main([*SWEEP, "--out", str(out), "--slurm", "--slurm-no-submit",
                 "--slurm-partition", "cpu", "--parallel", "2"], python=fake_python) == 0
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --partition=cpu" in script
    assert "grpo-s0" not in script and str(out.resolve() / "runs" / "dgpo-s1") in script
    assert "wrote" in capsys.readouterr().out


def test_sweep_rejects_missing_options(tmp_path: Path):
    with pytest.raises(ValueError, match="missing --losses, --seeds"):
        main(["--config", "configs/tiny.yaml", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--baseline 'ppo'"):
        main([*SWEEP, "--out", str(tmp_path), "--baseline", "ppo", "--dry-run"])
    with pytest.raises(ValueError, match="--run .*no run.json"):
        main(["--run", str(tmp_path)])


def test_dgpo_cli_dispatches_sweep(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        dgpo_main(["sweep", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dgpo sweep")
