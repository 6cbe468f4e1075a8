"""Evaluation on math benchmarks: sampling settings, the evaluator and the results table.

The benchmark files themselves (:class:`Benchmark`, their prompts and data loaders) are data:
they live in :mod:`dgpo.data.benchmarks` and are re-exported here.
"""

from dgpo.data.benchmarks import (
    Benchmark,
    BenchmarkBatch,
    BenchmarkDataset,
    benchmark_dataloader,
    benchmark_prompts,
    evaluation_shard,
    load_benchmark,
)
from dgpo.evaluation.config import EvalConfig
from dgpo.evaluation.evaluator import Evaluator
from dgpo.evaluation.results import markdown_table, results_record, write_results

__all__ = [
    "Benchmark",
    "BenchmarkBatch",
    "BenchmarkDataset",
    "EvalConfig",
    "Evaluator",
    "benchmark_dataloader",
    "benchmark_prompts",
    "evaluation_shard",
    "load_benchmark",
    "markdown_table",
    "results_record",
    "write_results",
]
