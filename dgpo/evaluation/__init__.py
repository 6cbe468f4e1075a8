"""Evaluation on math benchmarks: benchmark sources, sampling settings and the results table.

The :class:`~dgpo.evaluation.evaluator.Evaluator` that runs validation and test lives in
:mod:`dgpo.evaluation.evaluator` (not imported here: :mod:`dgpo.data` imports this package).
"""

from dgpo.evaluation.benchmarks import (
    Benchmark,
    BenchmarkBatch,
    BenchmarkDataset,
    benchmark_dataloader,
    benchmark_prompts,
    evaluation_shard,
    load_benchmark,
)
from dgpo.evaluation.config import EvalConfig
from dgpo.evaluation.results import markdown_table, results_record, write_results

__all__ = [
    "Benchmark",
    "BenchmarkBatch",
    "BenchmarkDataset",
    "EvalConfig",
    "benchmark_dataloader",
    "benchmark_prompts",
    "evaluation_shard",
    "load_benchmark",
    "markdown_table",
    "results_record",
    "write_results",
]
