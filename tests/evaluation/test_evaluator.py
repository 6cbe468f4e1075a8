"""The evaluator's bookkeeping with a scripted engine, and the results table it writes."""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dgpo.data import PromptSample
from dgpo.evaluation import (
    BenchmarkBatch,
    EvalConfig,
    markdown_table,
    results_record,
    write_results,
)
from dgpo.evaluation.evaluator import Evaluator
from dgpo.rollout import Completion, RolloutEngine, SamplingConfig


class ScriptedEngine(RolloutEngine):
    """Answers prompt ``i`` with the texts ``script[i]`` (one per sample), one token per char."""

    def __init__(self, script: dict[int, list[str]]) -> None:
        self.script = script
        self.loaded = 0
        self.samplings: list[SamplingConfig] = []

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        self.samplings.append(sampling)
        out = []
        for index, prompt in enumerate(prompt_ids):
            texts = self.script[prompt[0]]
            assert len(texts) == sampling.n
            out += [Completion(index, list(range(len(text))), text,
                               "length" if len(text) >= sampling.max_new_tokens else "stop", None)
                    for text in texts]
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.loaded += len(list(named_tensors))

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        raise NotImplementedError


def prompt(key: int, answer: str, alternatives: list[str] | None = None) -> PromptSample:
    columns = {"problem": f"p{key}", "answer": answer}
    if alternatives is not None:
        columns["answer_alternatives"] = alternatives
    return PromptSample(text=f"p{key}", prompt_ids=[key], answer=answer, columns=columns)


def fake_module(engine: RolloutEngine) -> SimpleNamespace:
    weights = {"w": torch.zeros(2)}
    return SimpleNamespace(policy_for_engine=lambda: None, model_path="m", device="cpu",
                           named_weights_for_engine=lambda: iter(weights.items()))


@pytest.fixture
def evaluator() -> Iterator[Evaluator]:
    evaluator = Evaluator(EvalConfig(k=4, pass_k=[1, 2, 4], max_new_tokens=40, reward_workers=1))
    yield evaluator
    evaluator.close()


BOXED = "The answer is \\boxed{{{}}}."
SCRIPT = {
    1: [BOXED.format(3), BOXED.format(3), BOXED.format(4), "no idea"],  # 2 of 4, majority 3 ✓
    2: [BOXED.format(5), BOXED.format(5), BOXED.format(5), BOXED.format(6)],  # 0 of 4
    3: [BOXED.format("0.5"), BOXED.format(7), BOXED.format(7), "x" * 45],  # alt 0.5 ✓, truncated
}


def loaders(*names: str) -> list:
    return [SimpleNamespace(dataset=SimpleNamespace(name=name)) for name in names]


def test_evaluator_counts_metrics_per_benchmark_and_mean(evaluator: Evaluator) -> None:
    engine = ScriptedEngine(SCRIPT)
    evaluator.engine = engine  # the config's engine: section, handed over by the CLI
    evaluator.start(fake_module(engine), loaders("a", "b"))
    assert engine.loaded == 1, "the policy's weights go into the engine first"
    evaluator.step(BenchmarkBatch("a", [prompt(1, "3"), prompt(2, "9")]), 0)
    evaluator.step(BenchmarkBatch("b", [prompt(3, "1/2", ["\\frac{1}{2}"])]), 0)
    scores = evaluator.compute()
    a, b = scores["a"], scores["b"]
    assert a["avg@4"] == pytest.approx((0.5 + 0.0) / 2)
    assert a["pass@1"] == pytest.approx(0.25)
    assert a["pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # c=2 of 4: 1 - C(2,2)/C(4,2)
    assert a["pass@4"] == pytest.approx(0.5)
    assert a["maj@4"] == pytest.approx(0.5)
    assert b["avg@4"] == pytest.approx(0.25)  # the gold "1/2" accepts 0.5 through math-verify
    assert b["maj@4"] == pytest.approx(0.0)  # 7 wins the vote
    assert b["truncated"] == pytest.approx(0.25)
    assert b["response_length"] == pytest.approx(sum(len(t) for t in SCRIPT[3]) / 4)
    assert scores["mean"]["avg@4"] == pytest.approx((0.25 + 0.25) / 2)
    assert evaluator.problems == {"a": 2, "b": 1}
    assert engine.samplings[0].temperature == 0.6 and engine.samplings[0].n == 4

    evaluator.start(fake_module(engine), loaders("a"))  # a new evaluation starts from zero
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        assert list(evaluator.compute()) == ["a", "mean"]
    assert evaluator.problems == {"a": 0}


def test_evaluator_alternatives_rescue_only_wrong_answers(evaluator: Evaluator) -> None:
    prompts = [prompt(1, "2", ["two", "2.0"]), prompt(1, "2", ["3"])]
    correct, answers = evaluator.score(prompts, [BOXED.format("2.0"), BOXED.format(3)])
    assert correct.tolist() == [True, True]
    assert answers == ["2.0", "3"]


def test_results_table_in_the_paper_layout(tmp_path: Path) -> None:
    scores = {"aime24": {"avg@4": 0.125, "pass@4": 0.5, "maj@4": 0.25, "response_length": 100.0,
                         "truncated": 0.0},
              "math500": {"avg@4": 0.5, "pass@4": 0.75, "maj@4": 0.5, "response_length": 50.0,
                          "truncated": 0.5}}
    scores["mean"] = {key: (scores["aime24"][key] + scores["math500"][key]) / 2
                      for key in scores["aime24"]}
    record = results_record("my-model", scores, {"k": 4, "temperature": 0.6},
                            {"aime24": 30, "math500": 500})
    table = markdown_table(record, ["avg@4", "pass@4"])
    lines = table.splitlines()
    assert lines[0] == ("| Model | aime24 Avg@4 | aime24 Pass@4 | math500 Avg@4 | math500 Pass@4 "
                        "| Mean Avg@4 | Mean Pass@4 |")
    assert lines[2] == "| `my-model` | 12.5 | 50.0 | 50.0 | 75.0 | 31.2 | 62.5 |"
    assert "| aime24 | 30 | 12.5 | 50.0 | 25.0 | 100.0 | 0.0 |" in lines
    assert "| Mean | 530 | 31.2 | 62.5 | 37.5 | 75.0 | 25.0 |" in lines
    assert lines[-1] == "Settings: k=4, temperature=0.6."
    write_results(tmp_path / "run", record, ["avg@4", "pass@4"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["benchmarks"]["math500"] == {"problems": 500, **scores["math500"]}
    assert saved["mean"]["pass@4"] == pytest.approx(0.625)
    assert (tmp_path / "run" / "results.md").read_text() == table
