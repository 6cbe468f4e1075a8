"""Run folders, ``--ckpt_path last``, signals and exit codes, with real ``dgpo fit`` processes.

One uninterrupted run (2 epochs of the tiny config, in this process) is the reference. Against
it: a run killed with SIGKILL in its second epoch and resumed with the README's command, a run
stopped by SIGTERM in its second epoch and resumed the same way, and a 2-node torchrun launch;
besides, SIGINT's exit code, three runs started at once into one folder, and the errors.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dgpo.cli import main
from dgpo.runs import EXIT_SIGINT, EXIT_SIGTERM, claim_version
from tests.test_cli import tiny_config

REPO = Path(__file__).resolve().parents[1]
#: The README's resume command, run in the folder that holds ``runs/``.
README_RESUME = ["fit", "--config", "runs/tiny/version_0/config.yaml", "--ckpt_path", "last"]
#: Wall-clock metrics differ between any two runs.
TIMING = ("time/", "rollout/tokens_per_second")
#: Generous limit for one tiny fit on a loaded CPU.
TIMEOUT = 900


def write_config(root: Path, model_path: str, *callbacks: dict, **changes) -> Path:
    """The tiny config with relative run paths (``runs/tiny/version_<n>`` under ``root``)."""
    path = tiny_config(root, model_path, **{"trainer.max_epochs": 2,
                                            "trainer.log_every_n_steps": 1, **changes})
    config = yaml.safe_load(path.read_text())
    config["trainer"]["default_root_dir"] = "runs/tiny"
    config["trainer"]["logger"]["init_args"]["save_dir"] = "runs"
    config["trainer"]["callbacks"] += list(callbacks)
    path.write_text(yaml.safe_dump(config))
    return path


def _interruptible() -> None:
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored
    # (POSIX), and Python then leaves it ignored; a user's terminal delivers Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def dgpo(root: Path, *args: str, **kwargs) -> subprocess.Popen:
    """``python -m dgpo <args>`` in ``root``, as a user would type it (Ctrl-C not ignored)."""
    return subprocess.Popen([sys.executable, "-m", "dgpo", *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_interruptible, **kwargs)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=TIMEOUT)
    return process.returncode, output


def metrics(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "metrics.csv")
    return frame[[c for c in frame.columns if not c.startswith(TIMING)]]


def completions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()]


def assert_same_run(folder: Path, reference: Path, rtol: float = 1e-5) -> None:
    """Same metric rows (each epoch and step once) and completions as the reference run."""
    got, expected = metrics(folder), metrics(reference)
    assert got[["epoch", "step"]].equals(expected[["epoch", "step"]])
    pd.testing.assert_frame_equal(got, expected[got.columns], check_exact=False, rtol=rtol,
                                  atol=1e-6)
    assert completions(folder) == completions(reference)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_path) -> Path:
    """The uninterrupted run's folder."""
    root = tmp_path_factory.mktemp("straight")
    config = write_config(root, tiny_model_path)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--config", str(config)])
    finally:
        os.chdir(cwd)
    return root / "runs" / "tiny" / "version_0"


def signal_at_epoch(root: Path, name: str, epoch: int, at: str = "start") -> dict:
    """A callback that signals its own run once, when ``epoch`` starts (or ends: ``at``)."""
    return {"class_path": "tests.plugins.SignalOnce",
            "init_args": {"signal_name": name, "epoch": epoch, "at": at,
                          "marker": str(root / "signalled")}}


def test_runs_sigkill_then_readme_resume_continues_the_same_run(tmp_path, tiny_model_path,
                                                                straight):
    killer = signal_at_epoch(tmp_path, "SIGKILL", 1, at="end")
    config = write_config(tmp_path, tiny_model_path, killer)
    code, output = finish(dgpo(tmp_path, "fit", "--config", str(config)))
    assert code == -signal.SIGKILL, output[-4000:]
    folder = tmp_path / "runs" / "tiny" / "version_0"
    saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0, "killed after epoch 1's completions, before its checkpoint"
    assert {row["epoch"] for row in completions(folder)} == {0, 1}
    assert metrics(folder)["epoch"].max() == 1, "epoch 1's step rows were written"

    code, output = finish(dgpo(tmp_path, *README_RESUME))
    assert code == 0, output[-4000:]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["version_0"]
    assert_same_run(folder, straight)


def test_runs_sigterm_exits_143_and_resumes(tmp_path, tiny_model_path, straight):
    config = write_config(tmp_path, tiny_model_path, signal_at_epoch(tmp_path, "SIGTERM", 1))
    process = dgpo(tmp_path, "fit", "--config", str(config))
    folder = tmp_path / "runs" / "tiny" / "version_0"
    code, output = finish(process)
    assert code == EXIT_SIGTERM, output[-4000:]
    assert "dgpo fit stopped by SIGTERM (exit code 143)" in output
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0

    code, output = finish(dgpo(tmp_path, *README_RESUME))
    assert code == 0, output[-4000:]
    assert_same_run(folder, straight)


def test_runs_sigint_exits_130_with_the_last_epoch_checkpoint(tmp_path, tiny_model_path):
    config = write_config(tmp_path, tiny_model_path, signal_at_epoch(tmp_path, "SIGINT", 1))
    process = dgpo(tmp_path, "fit", "--config", str(config))
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    code, output = finish(process)
    assert code == EXIT_SIGINT, output[-4000:]
    assert "dgpo fit stopped by SIGINT (exit code 130)" in output
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (0, 4)  # 16 samples / mini-batches of 4


def test_runs_concurrent_fits_get_separate_folders(tmp_path, tiny_model_path):
    config = write_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    processes = [dgpo(tmp_path, "fit", "--config", str(config)) for _ in range(3)]
    for process in processes:
        code, output = finish(process)
        assert code == 0, output[-4000:]
    folders = sorted((tmp_path / "runs" / "tiny").iterdir())
    assert [folder.name for folder in folders] == ["version_0", "version_1", "version_2"]
    for version, folder in enumerate(folders):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["trainer"]["logger"]["init_args"]["version"] == version
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
            "epoch=0-step=4.ckpt", "last.ckpt"]
        assert [row["epoch"] for row in completions(folder)] == [0] * 8  # 2 prompts x n 4
        # the same seed: the three runs are one run, row for row
        pd.testing.assert_frame_equal(metrics(folder), metrics(folders[0]), rtol=1e-5, atol=1e-6)
        assert completions(folder) == completions(folders[0])


def test_claim_version_gives_each_of_many_threads_its_own_folder(tmp_path):
    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_x").mkdir()
    claimed: list[int] = []
    threads = [threading.Thread(target=lambda: claimed.append(claim_version(tmp_path)))
               for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(4, 20))


@pytest.mark.parametrize("flag", ["max_epochs", "max_steps", "limit_train_batches"])
def test_runs_no_op_fit_is_an_error(tmp_path, tiny_model_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match=rf"^trainer.{flag} 0 trains nothing: allowed are"):
        main(["fit", "--config", str(config), f"--trainer.{flag}", "0"])
    assert not (tmp_path / "runs").exists(), "no run folder for a run that cannot start"


def test_runs_ckpt_path_last_errors_name_where_they_looked(tmp_path, tiny_model_path,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match=r"^--ckpt_path last: the config names no run"):
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    with pytest.raises(ValueError, match=r"^--ckpt_path last: no last.ckpt in "
                                         r"runs/tiny/version_7/checkpoints \("):
        main(["fit", "--config", str(config), "--trainer.logger.init_args.version", "7",
              "--ckpt_path", "last"])


def test_runs_rerunning_a_finished_runs_config_is_an_error(straight, monkeypatch):
    monkeypatch.chdir(straight.parents[2])
    with pytest.raises(ValueError, match=r"^runs/tiny/version_0 already holds a run with "
                                         r"checkpoints \(epoch=1-step=8.ckpt, last.ckpt\): "
                                         r"resume it with --ckpt_path last"):
        main(["fit", "--config", "runs/tiny/version_0/config.yaml"])


def test_runs_run_without_checkpoint_starts_over_in_its_folder(tmp_path, tiny_model_path,
                                                               monkeypatch):
    """A run named by its version (a requeued SLURM job) that died before its first checkpoint."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    folder = tmp_path / "runs" / "tiny" / "job-7"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,step,train/loss_step\n0,0,1.0\n")
    (folder / "completions.jsonl").write_text('{"epoch": 0}\n')
    main(["fit", "--config", str(config), "--trainer.logger.init_args.version", "job-7"])
    assert sorted(metrics(folder)["step"]) == [0, 1, 2, 3, 3]  # 4 step rows, 1 epoch row
    assert [row["epoch"] for row in completions(folder)] == [0] * 8
    assert sorted(p.name for p in folder.parent.iterdir()) == ["job-7"]


def test_runs_two_nodes_on_one_machine_match_one_process(tmp_path, tiny_model_path, straight):
    """``torchrun --nnodes 2 --node_rank {0,1}`` on 127.0.0.1, one process per "node" (gloo)."""
    config = write_config(tmp_path, tiny_model_path, **{
        "trainer.num_nodes": 2, "trainer.devices": 1, "trainer.strategy": "ddp"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "dgpo", "fit", "--config", str(config)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [finish(node) for node in nodes]
    for code, output in outputs:
        assert code == 0, output[-4000:]
    # rank 0 alone writes: one run folder, one config, one set of logs and checkpoints
    folder = tmp_path / "runs" / "tiny" / "version_0"
    # the quiet console keeps each rank's library lines in its own log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (folder / "console.rank1.log").read_text()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["version_0"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoints", "completions.jsonl", "config.yaml", "console.log", "console.rank1.log",
        "hparams.yaml", "metrics.csv"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "epoch=1-step=8.ckpt", "last.ckpt"]
    assert_same_run(folder, straight, rtol=1e-4)  # the scale-out tests' tolerance
