"""The console of a run: quiet by default (progress, a line per epoch), all with --verbose."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dgpo.cli import main
from dgpo.console import RunLog, native_stderr_to_log, split_verbose
from dgpo.progress import summary_line

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def run_cli(args: list[str], tmp_path: Path, model_path: str) -> str:
    """``dgpo <args>`` on configs/tiny.yaml in a fresh process; its stdout and stderr together."""
    args = [*args, "--config", str(TINY), "--model.model_name_or_path", model_path,
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    code = f"from dgpo.cli import main; main({args!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DGPO_VERBOSE", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1200)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_console_tiny_fit_prints_progress_and_one_line_per_epoch_without_warnings(
        tmp_path, tiny_model_path):
    output = run_cli(["fit"], tmp_path, tiny_model_path)
    warned = [line for line in output.splitlines() if re.search("warn", line, re.IGNORECASE)]
    assert warned == []
    (run,) = tmp_path.glob("tiny/version_*")
    log = (run / "console.log").read_text()
    for quiet in ("GPU available", "Seed set to 0", "litlogger", "`Trainer.fit` stopped"):
        assert quiet not in output and quiet in log
    assert f"full log: {run / 'console.log'}" in output
    # one line per epoch, with the epoch's values as the CSV logger saved them
    frame = pd.read_csv(run / "metrics.csv").groupby("epoch").mean()
    lines = [line for line in output.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    for epoch, line in enumerate(lines):
        row = frame.loc[epoch]
        assert line.startswith(f"epoch {epoch}: reward {row['rollout/reward_mean']:.3f}, "
                               f"accuracy {row['rollout/reward/accuracy']:.3f}, "
                               f"length {row['rollout/response_length_mean']:.1f}, "
                               f"entropy {row['train/entropy']:.3f} | ")
        assert f"generation {row['time/generation_seconds']:.1f}s" in line
        assert f"train {row['time/train_seconds']:.1f}s" in line


def test_console_verbose_flag_restores_library_output(tmp_path, tiny_model_path):
    output = run_cli(["fit", "--verbose", "--trainer.max_epochs", "0"], tmp_path, tiny_model_path)
    assert "GPU available" in output and "Seed set to 0" in output
    assert "full log" not in output and not list(tmp_path.rglob("console.log"))


def test_console_split_verbose_removes_the_flag_and_reads_the_environment():
    assert split_verbose(["--verbose", "fit", "--verbose"], environ={}) == (True, ["fit"])
    assert split_verbose(["fit"], environ={}) == (False, ["fit"])
    assert split_verbose(["fit"], environ={"DGPO_VERBOSE": "1"}) == (True, ["fit"])
    assert split_verbose(["fit"], environ={"DGPO_VERBOSE": "0"}) == (False, ["fit"])
    assert split_verbose({"trainer": {}}, environ={}) == (False, {"trainer": {}})


def test_progress_summary_line_leaves_out_absent_metrics():
    metrics = {"rollout/reward_mean": 0.25, "rollout/response_length_mean": 12.34,
               "time/generation_seconds": 1.26, "time/scoring_seconds": 0.04, "train/lr": 1e-3}
    assert summary_line(0, metrics) == ("epoch 0: reward 0.250, length 12.3 | "
                                        "generation 1.3s, scoring 0.0s")


def test_cli_help_names_dgpo_and_only_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dgpo ")
    assert "{fit,validate,test}" in text and "predict" not in text
    assert "--verbose" in text


def test_console_native_stderr_goes_to_the_run_log_while_quiet(tmp_path, capfd):
    root = logging.getLogger()
    run_log = RunLog()
    root.addHandler(run_log)
    try:
        path = run_log.open(tmp_path)
        with native_stderr_to_log("native"):
            os.write(2, b"[W utils.cpp:68] Warning: NUMA binding\n")
        with pytest.raises(RuntimeError), native_stderr_to_log("native"):
            os.write(2, b"fatal: no memory\n")
            raise RuntimeError("start failed")
    finally:
        root.removeHandler(run_log)
        run_log.close()
    logged = path.read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in logged] == [
        "WARNING native: [W utils.cpp:68] Warning: NUMA binding",
        "ERROR native: fatal: no memory"]
    assert "NUMA" not in capfd.readouterr().err
