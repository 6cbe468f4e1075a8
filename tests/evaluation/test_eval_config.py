"""``EvalConfig``'s Pass@k default follows k, so ``--model.evaluation.k`` alone is enough."""

import json
from pathlib import Path

import pytest

from dgpo.cli import main
from dgpo.evaluation import EvalConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("k", "pass_k", "expected"), [
    (2, None, [1, 2]), (1, None, [1]), (32, None, [1, 32]), (8, [4, 2, 4], [2, 4])])
def test_eval_config_pass_k_defaults_to_one_and_k(k, pass_k, expected):
    config = EvalConfig(k=k, pass_k=pass_k)
    assert config.pass_ks == expected
    assert config.metric_names == [f"avg@{k}", *[f"pass@{j}" for j in expected], f"maj@{k}"]


def test_eval_config_pass_k_above_k_is_an_error():
    with pytest.raises(ValueError, match=r"pass_k must be .* in \[1, k=2\]"):
        EvalConfig(k=2, pass_k=[1, 32])


def test_eval_config_k_alone_overrides_the_paper_eval_config(tmp_path, tiny_model_path):
    benchmark = tmp_path / "sums.jsonl"
    benchmark.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    cli = main(["--config", str(REPO / "configs" / "eval" / "math6.yaml"),
                "--model.evaluation.k", "2", "--model.model_name_or_path", tiny_model_path,
                "--trainer.default_root_dir", str(tmp_path),
                "--data.benchmarks", json.dumps([{"name": "sums", "path": str(benchmark)}])],
               run=False)
    assert cli.model.evaluator.config.metric_names == ["avg@2", "pass@1", "pass@2", "maj@2"]
