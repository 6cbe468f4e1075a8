import json
from pathlib import Path

import pytest

from dgpo.sweep.plan import (
    Run,
    loss_label,
    parse_assignment,
    parse_grid,
    plan_runs,
    read_runs,
    write_run,
)

CONFIG = "configs/tiny.yaml"


def test_plan_runs_losses_times_seeds(tmp_path: Path):
    runs = plan_runs(CONFIG, ["grpo", "configs/losses/cispo.yaml"], [0, 1],
                     [("trainer.max_epochs", "2")], [], tmp_path / "sw")
    # seed by seed: a sweep stopped part-way has the same seeds for every method
    assert [r.run_id for r in runs] == ["grpo-s0", "cispo-s0", "grpo-s1", "cispo-s1"]
    assert [r.method for r in runs] == ["grpo", "cispo", "grpo", "cispo"]
    run_dir = (tmp_path / "sw" / "runs" / "cispo-s1").resolve()
    assert runs[3].run_dir == str(run_dir)
    args = list(runs[3].fit_args)
    assert args[:6] == ["fit", "--config", str(Path(CONFIG).resolve()), "--config",
                        str(Path("configs/losses/cispo.yaml").resolve()), "--seed_everything"]
    assert args[6:8] == ["1", "--trainer.max_epochs=2"]
    assert args[8:10] == ["--trainer.default_root_dir", str(run_dir)]
    logger = json.loads(args[args.index("--trainer.logger") + 1])
    # CSVLogger's log_dir is save_dir/name/version: the run folder
    init = logger["init_args"]
    assert Path(init["save_dir"], init["name"], init["version"]) == run_dir
    assert logger["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert list(runs[0].fit_args[3:7]) == ["--model.loss", "grpo", "--seed_everything", "0"]


def test_plan_runs_grid_points_are_methods(tmp_path: Path):
    runs = plan_runs(CONFIG, ["dgpo"], [3], [], parse_grid(["model.lr=1e-5,2e-5"]), tmp_path)
    assert [r.method for r in runs] == ["dgpo model.lr=1e-5", "dgpo model.lr=2e-5"]
    assert [r.run_id for r in runs] == ["dgpo+model.lr=1e-5-s3", "dgpo+model.lr=2e-5-s3"]
    assert "--model.lr=2e-5" in runs[1].fit_args
    assert runs[1].grid == (("model.lr", "2e-5"),)


def test_plan_runs_rejects_bad_settings(tmp_path: Path):
    with pytest.raises(ValueError, match="'nosuch'"):
        plan_runs(CONFIG, ["nosuch"], [0], [], [], tmp_path)
    with pytest.raises(ValueError, match=r"\[0, 0\]"):
        plan_runs(CONFIG, ["grpo"], [0, 0], [], [], tmp_path)
    with pytest.raises(ValueError, match="'missing.yaml'"):
        plan_runs("missing.yaml", ["grpo"], [0], [], [], tmp_path)
    with pytest.raises(ValueError, match="share the method name"):
        plan_runs(CONFIG, ["grpo", "configs/losses/grpo.yaml"], [0], [], [], tmp_path)


def test_loss_label_names_and_files():
    assert loss_label("gppo") == "gppo"
    assert loss_label("configs/losses/ce_gppo.yaml") == "ce_gppo"
    with pytest.raises(ValueError, match="no such loss config file"):
        loss_label("configs/losses/none.yaml")


def test_parse_assignment_and_grid():
    assert parse_assignment("model.lr=1e-5", "--set") == ("model.lr", "1e-5")
    assert parse_assignment("--data.template=a=b", "--set") == ("data.template", "a=b")
    with pytest.raises(ValueError, match="--set 'model.lr'"):
        parse_assignment("model.lr", "--set")
    assert parse_grid(["a.b=1,2", "c=x"]) == [("a.b", ["1", "2"]), ("c", ["x"])]
    with pytest.raises(ValueError, match="empty value"):
        parse_grid(["a=1,"])
    with pytest.raises(ValueError, match="'a' given twice"):
        parse_grid(["a=1", "a=2"])


def test_write_run_keeps_settings(tmp_path: Path):
    run = plan_runs(CONFIG, ["grpo"], [0], [], [], tmp_path)[0]
    write_run(run)
    write_run(run)  # the same plan again: fine
    assert read_runs(tmp_path) == [run]
    other = plan_runs(CONFIG, ["grpo"], [0], [("model.lr", "1")], [], tmp_path)[0]
    with pytest.raises(ValueError, match=r"'grpo-s0'.*--model.lr=1"):
        write_run(other)
    assert Run.from_json(json.loads((Path(run.run_dir) / "run.json").read_text())) == run
