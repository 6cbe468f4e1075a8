"""Benchmark sources (local files, the hub), their data loaders, and the shared benchmark files."""

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dgpo.data import RLVRDataModule, arithmetic_problems
from dgpo.evaluation import (
    Benchmark,
    BenchmarkBatch,
    BenchmarkDataset,
    EvalConfig,
    benchmark_dataloader,
    benchmark_prompts,
    load_benchmark,
)
from dgpo.evaluation.evaluator import Evaluator

# The ``shared`` folder beside the repository root (see shared/data/README.md); optional.
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
COUNTS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272,
          "olympiadbench": 675}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


ONE_SOURCE = "give exactly one of path, hf_id and synthetic"
ROWS = [{"id": str(i), "question": f"What is {i} + {i}?", "gold": 2 * i, "alts": [f"{2 * i}.0"]}
        for i in range(5)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "x"}, ONE_SOURCE),
        ({"name": "x", "path": "a.jsonl", "hf_id": "org/x"}, ONE_SOURCE),
        ({"name": "has space", "path": "a.jsonl"}, "letters, digits"),
        ({"name": "mean", "path": "a.jsonl"}, "reserved"),
        ({"name": "x", "path": "a.jsonl", "limit": 0}, "limit must be None or an integer >= 1"),
    ],
)
def test_benchmark_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Benchmark(**kwargs)


def test_synthetic_benchmark_is_the_held_out_split_of_the_training_task() -> None:
    task = {"operations": ["+", "*"], "max_operand": 9, "held_out_fraction": 0.2}
    benchmark = Benchmark("held_out", synthetic={"num_problems": 12, "seed": 1,
                                                 "split": "held_out", **task})
    assert benchmark.source == "synthetic (held_out split)"
    rows = load_benchmark(benchmark, limit=10)
    assert len(rows) == 10
    assert [r["problem"] for r in rows] == [
        p["problem"] for p in arithmetic_problems(10, 1, ("+", "*"), 9, 2, "held_out", 0.2)]
    train = {p["problem"] for p in arithmetic_problems(500, 0, ("+", "*"), 9, 2, "train", 0.2)}
    assert not train & {r["problem"] for r in rows}
    with pytest.raises(ValueError, match="give exactly one of path, hf_id and synthetic"):
        Benchmark("x", path="a.jsonl", synthetic={"num_problems": 2})


def test_load_benchmark_local_file_fields_limit_and_alternatives(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", ROWS)
    benchmark = Benchmark("b", path=path, problem_field="question", answer_field="gold",
                          alternatives_field="alts", limit=4)
    rows = load_benchmark(benchmark, limit=3)
    assert [row["problem"] for row in rows] == [f"What is {i} + {i}?" for i in range(3)]
    assert [row["answer"] for row in rows] == ["0", "2", "4"]
    assert rows[1]["answer_alternatives"] == ["2.0"]
    assert len(load_benchmark(benchmark)) == 4
    with pytest.raises(ValueError, match=r"'problem' is not in"):
        load_benchmark(Benchmark("b", path=path))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark(Benchmark("b", path=str(tmp_path / "nope.jsonl")))


def test_load_benchmark_parquet(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1", "answer": "2"}]), path)
    assert load_benchmark(Benchmark("b", path=str(path)))[0]["answer"] == "2"


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A stand-in ``datasets`` package recording its calls (the hub is not reachable here)."""
    calls: list[tuple] = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict]:
        calls.append((path, name, split))
        return [{"question": "Q1", "final_answer": ["$\\frac{1}{2}$"]},
                {"question": "Q2", "final_answer": ["3"]},
                {"question": "", "final_answer": ["4"]}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_load_benchmark_from_the_hub(fake_datasets: list[tuple]) -> None:
    benchmark = Benchmark("olympiad", hf_id="Hothan/OlympiadBench", split="train",
                          hf_subset="OE_TO_maths_en_COMP", problem_field="question",
                          answer_field="final_answer")
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        rows = load_benchmark(benchmark)
    assert fake_datasets == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
    assert [(row["problem"], row["answer"]) for row in rows] == [("Q1", "$\\frac{1}{2}$"),
                                                                ("Q2", "3")]
    with pytest.raises(ValueError, match=r"field 'problem' is not in hf://Hothan"):
        load_benchmark(Benchmark("o", hf_id="Hothan/OlympiadBench"))


def test_load_benchmark_from_the_hub_needs_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_benchmark(Benchmark("m", hf_id="HuggingFaceH4/MATH-500"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_benchmark_dataloader_shards_ranks_without_repeats(tmp_path: Path, tokenizer) -> None:
    rows = load_benchmark(Benchmark("b", path=write_jsonl(tmp_path / "b.jsonl", ROWS),
                                    problem_field="question", answer_field="gold"))
    dataset = BenchmarkDataset("b", benchmark_prompts(rows, tokenizer, "{problem}", True, None))
    (batch, *rest) = list(benchmark_dataloader(dataset, batch_size=8))
    assert not rest and isinstance(batch, BenchmarkBatch) and batch.benchmark == "b"
    assert [p.answer for p in batch.prompts] == ["0", "2", "4", "6", "8"]
    assert batch.prompts[0].text.endswith("<|im_start|>assistant\n")  # chat template applied
    seen = [p.answer for rank in (0, 1)
            for b in benchmark_dataloader(dataset, batch_size=2, shards=2, shard=rank)
            for p in b.prompts]
    assert sorted(seen) == ["0", "2", "4", "6", "8"]  # 5 problems on 2 ranks: none repeated


def test_rlvr_datamodule_with_benchmarks_only(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", ROWS)
    benchmarks = [{"name": "one", "path": path, "problem_field": "question",
                   "answer_field": "gold"},
                  Benchmark("two", path=path, problem_field="question", answer_field="gold")]
    dm = RLVRDataModule(benchmarks=benchmarks, eval_batch_size=2, eval_limit=3)
    assert dm.hparams["benchmarks"][0]["name"] == "one"  # plain values in the checkpoint
    dm.tokenizer = tokenizer
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert [loader.dataset.name for loader in loaders] == ["one", "two"]
    assert [len(batch) for batch in loaders[0]] == [2, 1]  # eval_limit=3, 2 per batch
    assert [loader.dataset.name for loader in dm.test_dataloader()] == ["one", "two"]
    with pytest.raises(ValueError, match="fit needs training problems"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="benchmark names must be unique"):
        RLVRDataModule(benchmarks=[benchmarks[1], benchmarks[1]])
    with pytest.raises(ValueError, match="exactly one of train_file and synthetic"):
        RLVRDataModule(benchmarks=[])


def test_rlvr_datamodule_without_benchmarks_has_no_eval_loaders() -> None:
    dm = RLVRDataModule(synthetic={"num_problems": 4})
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert not is_overridden("val_dataloader", dm) and not is_overridden("test_dataloader", dm)


@pytest.fixture(scope="module")
def evaluator() -> Iterator[Evaluator]:
    evaluator = Evaluator(EvalConfig(reward_workers=2, reward_timeout_s=10.0))
    yield evaluator
    evaluator.close()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data folder at {SHARED}")
@pytest.mark.parametrize("name", list(COUNTS))
def test_shared_benchmark_loads_and_every_boxed_gold_answer_scores(
    name: str, evaluator: Evaluator, tokenizer
) -> None:
    alternatives = "answer_alternatives" if name == "minerva" else None
    rows = load_benchmark(Benchmark(name, path=str(SHARED / f"{name}.jsonl"),
                                    alternatives_field=alternatives))
    assert len(rows) == COUNTS[name]
    prompts = benchmark_prompts(rows, tokenizer, None, True, None)
    correct, answers = evaluator.score(prompts, [f"So the answer is $\\boxed{{{p.answer}}}$."
                                                 for p in prompts])
    wrong = {rows[i]["id"]: rows[i]["answer"] for i in range(len(rows)) if not correct[i]}
    assert not wrong, f"{len(wrong)} gold answers of {name} did not score: {wrong}"
    assert all(answer is not None for answer in answers)
