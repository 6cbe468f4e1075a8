"""The benchmark scripts run end to end on toy sizes (their numbers are not checked here)."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import requires_vllm

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_logprobs_benchmark_prints_time_and_memory_ratios():
    last = run("logprobs.py", "--shapes", "3000x16x256", "--repeats", "1", "--chunk-size", "64")
    assert re.fullmatch(r"logprobs dgpo/naive: 3000x256: time [\d.]+x, memory [\d.]+%", last)


def test_rl_step_benchmark_runs_dgpo_with_the_transformers_engine():
    last = run("rl_step.py", "--model", "tiny", "--implementations", "dgpo-transformers",
               "--repeats", "1", "--steps", "1")
    assert re.fullmatch(r"rl_step tiny: dgpo-transformers [\d.]+ s", last)


@requires_vllm
def test_rollout_overhead_benchmark_prints_the_ratio():
    last = run("rollout_overhead.py", "--model", "builtin:tiny-qwen2", "--prompts", "2", "--n",
               "2", "--new-tokens", "8", "--iterations", "1")
    assert re.fullmatch(r"rollout_overhead: dgpo rollout phase [\d.]+ s, bare vLLM generate "
                        r"[\d.]+ s, ratio [\d.]+x", last)


def test_sharded_logprobs_benchmark_launches_two_ranks_per_strategy():
    strategies = ("fsdp1", "fsdp2", "ddp")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "sharded_logprobs.py"), "--model",
                           "builtin:tiny-qwen2", "--prompt", "8", "--response", "8",
                           "--repeats", "1", "--strategies", *strategies],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()[-3:]
    for strategy, line in zip(strategies, lines, strict=True):
        assert re.fullmatch(rf"sharded_logprobs {strategy} x2: 2x4 rows of 8\+8 tokens: plain "
                            r"[\d.]+ s, shared [\d.]+ s, ratio [\d.]+x", line), line
