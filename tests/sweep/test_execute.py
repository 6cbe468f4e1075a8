import os
from pathlib import Path

import pytest

from dgpo.sweep.execute import (
    Outcome,
    is_finished,
    last_checkpoint,
    progress_line,
    read_status,
    run_local,
    run_one,
)
from dgpo.sweep.plan import plan_runs, write_run


def _runs(out: Path, seeds=(0, 1)):
    runs = plan_runs("configs/tiny.yaml", ["grpo", "dgpo"], list(seeds), [], [], out)
    for run in runs:
        write_run(run)
    return runs


def _calls(run) -> list[str]:
    return (Path(run.run_dir) / "calls.txt").read_text().splitlines()


def test_run_one_runs_then_skips_when_finished(tmp_path: Path, fake_python: str):
    run = _runs(tmp_path)[0]
    first = run_one(run, fake_python)
    assert (first.returncode, first.skipped) == (0, False)
    assert _calls(run) == [" ".join(["-m", "dgpo", *run.fit_args])]
    status = read_status(Path(run.run_dir))
    assert status["state"] == "finished" and status["attempts"] == 1
    assert "fit output of" in (Path(run.run_dir) / "log.txt").read_text()
    again = run_one(run, fake_python)
    assert again.skipped and len(_calls(run)) == 1


def test_run_one_resumes_from_last_checkpoint(tmp_path: Path, fake_python: str,
                                              monkeypatch: pytest.MonkeyPatch):
    run = _runs(tmp_path)[0]
    monkeypatch.setenv("FAKE_FAIL", "grpo-s0")
    failed = run_one(run, fake_python)
    assert failed.returncode == 3
    status = read_status(Path(run.run_dir))
    assert (status["state"], status["returncode"]) == ("failed", 3)
    assert status["log"] == str(Path(run.run_dir) / "log.txt")
    first_wall = status["wall_seconds"]
    monkeypatch.delenv("FAKE_FAIL")
    resumed = run_one(run, fake_python)
    ckpt = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    assert resumed.returncode == 0
    assert _calls(run)[1].endswith(f"--ckpt_path {ckpt}")
    assert not _calls(run)[0].count("--ckpt_path")
    # the failed attempt's metrics are kept beside the resumed run's
    assert (Path(run.run_dir) / "metrics-attempt0.csv").is_file()
    status = read_status(Path(run.run_dir))
    assert status["attempts"] == 2 and status["wall_seconds"] >= first_wall
    assert is_finished(Path(run.run_dir))


def test_last_checkpoint_prefers_last_then_newest(tmp_path: Path):
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    old, new = tmp_path / "checkpoints" / "epoch=0.ckpt", tmp_path / "checkpoints" / "epoch=1.ckpt"
    old.touch()
    new.touch()
    os.utime(old, (1, 1))
    assert last_checkpoint(tmp_path) == new
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"


def test_run_local_reports_failures_and_skips_finished(tmp_path: Path, fake_python: str,
                                                      monkeypatch: pytest.MonkeyPatch):
    runs = _runs(tmp_path)
    run_one(runs[0], fake_python)  # grpo-s0 finished before the sweep starts
    monkeypatch.setenv("FAKE_FAIL", "dgpo-s1")
    lines: list[str] = []
    outcomes = run_local(runs, parallel=2, python=fake_python, echo=lines.append)
    assert sorted(o.run.run_id for o in outcomes) == ["dgpo-s0", "dgpo-s1", "grpo-s1"]
    assert {o.run.run_id: o.returncode for o in outcomes}["dgpo-s1"] == 3
    assert lines[0] == "1 of 4 runs already finished; skipping them"
    progress = lines[1:]
    assert [line.split(" ")[0] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"]
    failed = next(line for line in progress if "dgpo-s1" in line)
    assert f"FAILED (exit 3, log {Path(runs[3].run_dir) / 'log.txt'})" in failed
    assert progress[-1].endswith("~0m00s left")
    assert len(_calls(runs[0])) == 1


def test_progress_line_estimates_what_is_left(tmp_path: Path):
    run = _runs(tmp_path)[0]
    outcome = Outcome(run, 0, Path("log.txt"), 65.0)
    # 2 of 6 done, 100 s per run on average, 2 at a time: 4 * 100 / 2 = 200 s
    line = progress_line(2, 6, outcome, elapsed=130.0, mean_seconds=100.0, parallel=2)
    assert line == "[2/6] grpo-s0: done in 1m05s | elapsed 2m10s, ~3m20s left"


def test_run_local_rejects_parallel_zero(tmp_path: Path):
    with pytest.raises(ValueError, match="--parallel 0"):
        run_local(_runs(tmp_path), parallel=0)



def test_run_local_shares_cores_between_parallel_runs(tmp_path: Path, fake_python: str,
                                                      monkeypatch: pytest.MonkeyPatch):
    runs = _runs(tmp_path, seeds=(0,))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    run_local(runs, parallel=2, python=fake_python, echo=lambda line: None)
    for run in runs:  # 8 cores, 2 runs at once: 4 threads each
        assert (Path(run.run_dir) / "env.txt").read_text().strip() == "OMP_NUM_THREADS=4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    more = _runs(tmp_path / "more", seeds=(0,))
    run_local(more, parallel=2, python=fake_python, echo=lambda line: None)
    assert (Path(more[0].run_dir) / "env.txt").read_text().strip() == "OMP_NUM_THREADS=3"


def test_run_one_sigterm_with_exit_zero_is_not_finished(tmp_path: Path, fake_python: str,
                                                        monkeypatch: pytest.MonkeyPatch):
    run = _runs(tmp_path)[0]
    monkeypatch.setenv("FAKE_SIGTERM", "1")
    cut = run_one(run, fake_python)
    assert (cut.returncode, cut.interrupted, cut.ok) == (0, True, False)
    assert read_status(Path(run.run_dir))["state"] == "interrupted"
    line = progress_line(1, 1, cut, 1.0, 1.0, 1)
    assert "INTERRUPTED (SIGTERM; it resumes when the sweep starts again" in line
    monkeypatch.delenv("FAKE_SIGTERM")
    resumed = run_one(run, fake_python)  # the first attempt's SIGTERM line is not this attempt's
    assert resumed.ok and is_finished(Path(run.run_dir))
    ckpt = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    assert _calls(run)[1].endswith(f"--ckpt_path {ckpt}")
