"""``python -m dgpo validate|test`` and validation during ``fit``, end to end on a tiny model."""

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dgpo.cli import main
from tests.conftest import requires_vllm

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
BENCHMARKS = {"sums": [(1, 2), (3, 4), (5, 6)], "products": [(2, 3), (4, 5)]}
EVALUATION = {"k": 4, "pass_k": [1, 4], "max_new_tokens": 8, "temperature": 1.0,
              "extraction": "lenient", "reward_workers": 1}
VLLM_ENGINE = {"class_path": "dgpo.rollout.VLLMEngine",
               "init_args": {"dtype": "float32", "kv_cache_space_gib": 0.25, "max_model_len": 256}}


def benchmarks(tmp_path: Path) -> list[dict]:
    entries = []
    for name, pairs in BENCHMARKS.items():
        op, fn = ("+", int.__add__) if name == "sums" else ("*", int.__mul__)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"problem": f"What is {a} {op} {b}?",
                                            "answer": str(fn(a, b))}) + "\n" for a, b in pairs))
        entries.append({"name": name, "path": str(path)})
    return entries


def eval_config(tmp_path: Path, model_path: str, engine: dict | None = None) -> Path:
    """An evaluation-only config: no training data, only an engine (default: transformers)."""
    config = {
        "engine": engine or {"class_path": "dgpo.rollout.TransformersEngine"},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "eval"}}},
        "model": {"model_name_or_path": model_path, "evaluation": EVALUATION},
        "data": {"benchmarks": benchmarks(tmp_path), "eval_batch_size": 2},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_results(directory: Path, model: str) -> dict:
    record = json.loads((directory / "results.json").read_text())
    assert record["model"] == model
    assert record["settings"]["k"] == 4
    assert list(record["benchmarks"]) == ["sums", "products"]
    assert [b["problems"] for b in record["benchmarks"].values()] == [3, 2]
    names = ["avg@4", "pass@1", "pass@4", "maj@4", "response_length", "truncated"]
    for values in [*record["benchmarks"].values(), record["mean"]]:
        assert list(values)[-len(names):] == names
        assert all(math.isfinite(values[n]) for n in names)
        assert all(0 <= values[n] <= 1 for n in names if n != "response_length")
        assert 0 < values["response_length"] <= 8
        assert values["pass@4"] >= values["avg@4"] - 1e-9
    for name in names:
        mean = sum(b[name] for b in record["benchmarks"].values()) / 2
        assert record["mean"][name] == pytest.approx(mean)
    table = (directory / "results.md").read_text()
    assert table.startswith("| Model | sums Avg@4 | sums Pass@4 | products Avg@4 |")
    return record


@pytest.mark.parametrize("stage", ["test", "validate"])
def test_cli_evaluates_a_model_without_training_data(tmp_path, tiny_model_path, stage):
    main([stage, "--config", str(eval_config(tmp_path, tiny_model_path))])
    (directory,) = tmp_path.glob("eval/version_*")
    check_results(directory, tiny_model_path)
    metrics = pd.read_csv(directory / "metrics.csv")
    prefix = "test" if stage == "test" else "val"
    for name in ("sums/avg@4", "products/pass@4", "mean/avg@4", "mean/response_length"):
        assert f"{prefix}/{name}" in metrics.columns


@requires_vllm
def test_cli_test_with_the_vllm_engine(tmp_path, tiny_model_path):
    main(["test", "--config", str(eval_config(tmp_path, tiny_model_path, VLLM_ENGINE))])
    (directory,) = tmp_path.glob("eval/version_*")
    check_results(directory, tiny_model_path)


def test_cli_fit_validates_every_k_epochs_then_tests_the_checkpoint(tmp_path, tiny_model_path):
    config = copy.deepcopy(TINY)
    config["trainer"].update({"default_root_dir": str(tmp_path), "max_epochs": 2,
                              "check_val_every_n_epoch": 2, "num_sanity_val_steps": 0})
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["rollout"]["reward"] = {
        "class_path": "tests.plugins.DigitFractionReward"}
    # the checkpoint's evaluation settings (k = 2) must not override the test config's (k = 4)
    config["model"].update({"model_name_or_path": tiny_model_path,
                            "evaluation": {**EVALUATION, "k": 2, "pass_k": [1, 2]}})
    config["data"].update({"benchmarks": benchmarks(tmp_path), "eval_batch_size": 2})
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])

    (directory,) = tmp_path.glob("tiny/version_*")
    frame = pd.read_csv(directory / "metrics.csv")
    validated = frame.dropna(subset=["val/mean/avg@2"])
    assert list(validated["epoch"]) == [1], "validation runs every 2nd epoch only"
    assert not (directory / "results.json").exists(), "fit logs; it writes no results table"

    checkpoint = directory / "checkpoints" / "last.ckpt"
    (tmp_path / "test").mkdir()
    main(["test", "--config", str(eval_config(tmp_path / "test", tiny_model_path)),
          "--ckpt_path", str(checkpoint)])
    (directory,) = (tmp_path / "test").glob("eval/version_*")
    check_results(directory, str(checkpoint))


def test_eval_configs_are_math6_with_one_benchmark_each():
    folder = REPO / "configs" / "eval"
    six = yaml.safe_load((folder / "math6.yaml").read_text())
    names = [b["name"] for b in six["data"]["benchmarks"]]
    assert names == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted([*names, "math6"])
    for entry in six["data"]["benchmarks"]:
        config = yaml.safe_load((folder / f"{entry['name']}.yaml").read_text())
        assert config["data"].pop("benchmarks") == [entry]
        assert config == {**six, "data": {k: v for k, v in six["data"].items()
                                          if k != "benchmarks"}}
