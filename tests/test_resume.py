"""Exact resume, crash-safe checkpoints, the completions table and wandb offline."""

import json

import pandas as pd
import pytest
import torch
import yaml

from dgpo.checkpoint import AtomicCheckpointIO, restore_rng_states, rng_states
from dgpo.cli import main
from dgpo.rollout.completions import COLUMNS
from tests.test_cli import tiny_config

#: Wall-clock metrics differ between any two runs.
TIMING = ("time/", "rollout/tokens_per_second")


def resume_config(tmp_path, model_path, stop_after=None):
    config = tiny_config(tmp_path, model_path, **{"trainer.max_epochs": 4})
    data = yaml.safe_load(config.read_text())
    if stop_after is not None:
        data["trainer"]["callbacks"].append({"class_path": "tests.plugins.StopAfterEpochs",
                                             "init_args": {"epochs": stop_after}})
    config.write_text(yaml.safe_dump(data))
    return config


def comparable(metrics_csv):
    frame = pd.read_csv(metrics_csv).groupby("epoch").mean()
    keep = [c for c in frame.columns if not c.startswith(TIMING) and c != "step"]
    return frame[keep]


def test_resume_continues_the_same_curve_and_parameters(tmp_path, tiny_model_path):
    straight = main(["fit", "--config",
                     str(resume_config(tmp_path / "straight", tiny_model_path))])
    first = main(["fit", "--config",
                  str(resume_config(tmp_path / "resumed", tiny_model_path, stop_after=2))])
    assert first.trainer.current_epoch == 2
    last = next((tmp_path / "resumed").glob("tiny/version_0/checkpoints/last.ckpt"))
    resumed = main(["fit", "--config", str(resume_config(tmp_path / "resumed", tiny_model_path)),
                    "--ckpt_path", str(last)])

    expected = comparable(next((tmp_path / "straight").glob("tiny/version_0/metrics.csv")))
    got = comparable(next((tmp_path / "resumed").glob("tiny/version_1/metrics.csv")))
    assert list(got.index) == [2, 3], "the resumed run trains epochs 3 and 4, not zero steps"
    pd.testing.assert_frame_equal(got, expected.loc[[2, 3], got.columns], check_exact=False,
                                  rtol=1e-5, atol=1e-6)
    assert resumed.trainer.global_step == straight.trainer.global_step
    for (name, a), b in zip(straight.model.policy.state_dict().items(),
                            resumed.model.policy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_atomic_checkpoint_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, target)

    def crash_midway(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full while saving")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2, "weights": torch.zeros(3)}, target)
    monkeypatch.undo()
    loaded = io.load_checkpoint(target)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left"


def test_cli_checkpoint_crash_keeps_previous_last_ckpt(tmp_path, tiny_model_path, monkeypatch):
    config = tiny_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:  # both runs write the same last.ckpt
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(config)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)

    real_save = torch.save

    def crash_on_checkpoint(obj, file, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj:
            file.write(b"partial")
            raise OSError("process killed while saving")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_checkpoint)
    with pytest.raises(OSError, match="killed while saving"):
        main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path",
              str(last)])
    monkeypatch.undo()
    after = torch.load(last, weights_only=True)
    assert after["epoch"] == before["epoch"] == 0
    assert after["global_step"] == before["global_step"]
    assert not list(last.parent.glob(".*.tmp")), "no temporary file is left"


def test_rng_states_round_trip():
    states = rng_states()
    expected = (torch.rand(3), __import__("random").random(),
                __import__("numpy").random.rand())
    restore_rng_states(states)
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_completions_table_has_the_documented_columns(tmp_path, tiny_model_path):
    config = tiny_config(tmp_path, tiny_model_path)
    main(["fit", "--config", str(config)])
    (path,) = tmp_path.glob("tiny/version_0/completions.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(tuple(row) == COLUMNS for row in rows)
    assert {row["epoch"] for row in rows} == {0, 1}
    assert len(rows) == 2 * 2 * 4  # 2 epochs x max_prompts 2 x n 4
    assert all(isinstance(row["length"], int) and isinstance(row["truncated"], bool)
               for row in rows)


def test_wandb_offline_writes_a_run_directory(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    data = yaml.safe_load(config.read_text())
    data["trainer"]["logger"] = [
        data["trainer"]["logger"],
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": "dgpo-tests", "name": "tiny", "offline": True,
                       "save_dir": str(tmp_path)}},
    ]
    config.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(config)])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "wandb offline wrote no run directory"
    assert list(runs[0].glob("*.wandb"))
