import os
import subprocess
from pathlib import Path

import pytest

from dgpo.sweep.plan import plan_runs
from dgpo.sweep.slurm import SlurmOptions, array_script, submit, write_scripts

ECHO = "#!/bin/bash\necho \"$@\"\n"


def _executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _runs(out: Path):
    return plan_runs("configs/tiny.yaml", ["grpo", "dgpo"], [0, 1, 2], [], [], out)


def test_array_script_directives(tmp_path: Path):
    options = SlurmOptions(partition="gpu", time="02:00:00", gpus=1, cpus=8, mem="32G",
                           max_running=4, setup=("source .venv/bin/activate",),
                           extra=("--account=abc",))
    text = array_script(_runs(tmp_path / "sw"), tmp_path / "sw", options, python="/env/python")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    out = (tmp_path / "sw").resolve()
    assert directives == [
        "#SBATCH --job-name=dgpo-sweep-sw", "#SBATCH --time=02:00:00", "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
        "#SBATCH --mem=32G", "#SBATCH --account=abc", "#SBATCH --array=0-5%4",
        f"#SBATCH --output={out}/slurm/%A_%a.out"]
    assert "source .venv/bin/activate" in lines
    assert lines[-1] == 'exec /env/python -m dgpo sweep --run "${RUNS[$SLURM_ARRAY_TASK_ID]}"'


def test_array_script_index_maps_to_run(tmp_path: Path):
    """Each array index runs `dgpo sweep --run <that run's folder>` (run with bash, fake python)."""
    runs = _runs(tmp_path / "sw")
    fake = _executable(tmp_path / "python", ECHO)
    script = tmp_path / "sweep.sbatch"
    script.write_text(array_script(runs, tmp_path / "sw", SlurmOptions(), python=fake))
    for index, run in enumerate(runs):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index)}
        result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                                check=True, cwd=tmp_path)
        assert result.stdout.split() == ["-m", "dgpo", "sweep", "--run", run.run_dir]


def test_array_script_needs_runs(tmp_path: Path):
    with pytest.raises(ValueError, match="every run of the sweep has finished"):
        array_script([], tmp_path, SlurmOptions())


def test_submit_chains_report_after_array(tmp_path: Path):
    runs = _runs(tmp_path / "sw")
    array, report = write_scripts(runs, tmp_path / "sw", SlurmOptions(), python="/env/python")
    assert report.read_text().splitlines()[-1] == (
        f"exec /env/python -m dgpo sweep --report {(tmp_path / 'sw').resolve()}")
    log = tmp_path / "sbatch.log"
    fake = _executable(tmp_path / "sbatch", f'#!/bin/bash\necho "$@" >> {log}\n'
                       'echo "$(( $(wc -l < ' + str(log) + ') + 41 ));cluster"\n')
    assert submit(array, report, sbatch=fake) == ("42", "43")
    assert log.read_text().splitlines() == [f"--parsable {array}",
                                            f"--parsable --dependency=afterany:42 {report}"]


def test_submit_errors_name_sbatch(tmp_path: Path):
    array, report = write_scripts(_runs(tmp_path / "sw"), tmp_path / "sw", SlurmOptions())
    with pytest.raises(RuntimeError, match="sbatch '/no/sbatch' not found"):
        submit(array, report, sbatch="/no/sbatch")
    refuse = _executable(tmp_path / "sbatch", "#!/bin/bash\necho 'invalid partition' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="exit code 1: invalid partition"):
        submit(array, report, sbatch=refuse)
