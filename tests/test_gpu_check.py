"""benchmarks/gpu_check.py at tiny sizes on CPU, as the GPU machine would import it.

The GPU machine has no vLLM, math-verify, jsonargparse or wandb: the script runs here with those
packages hidden (``sys.modules[name] = None``: imports fail and ``find_spec`` says "absent").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("vllm", "math_verify", "jsonargparse", "wandb")
RUNNER = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_gpu_check_runs_tiny_without_the_packages_missing_there(tmp_path: Path) -> None:
    runner = RUNNER.format(absent=ABSENT_ON_GPU_MACHINE,
                           script=str(ROOT / "benchmarks" / "gpu_check.py"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", runner, "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())

    # by hand, tiny model (vocab 512, hidden 64, MLP 128, 4 heads of 16, 2 KV heads, 2 layers,
    # untied head): per layer q 64·64+64, k and v 64·32+32, o 64·64, MLP 3·64·128, 2 norms of 64
    per_layer = 4160 + 2 * 2080 + 4096 + 3 * 8192 + 128
    full = 2 * 512 * 64 + 64 + 2 * per_layer
    lora = 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r (in + out) per linear layer
    train = report["train"]
    assert [(c["strategy"], c["mode"], c["checkpointing"]) for c in train] == [
        (s, m, c) for s in ("fsdp1", "fsdp2") for m in ("full", "lora") for c in (False, True)]
    for case in train:
        assert "error" not in case, case
        assert case["trainable_params"] == (full if case["mode"] == "full" else lora) > 0
        assert case["seconds"] > 0 and case["peak_gib"] is None  # no GPU memory on CPU
        assert case["grad_norm"] > 0  # also through the checkpointed layers into the adapters

    for case in report["lora_sync"]:  # FSDP1, FSDP2: gathered + merged = unsharded merge
        assert "error" not in case, case
        # by hand: 2 norms, q/k/v weight + bias, o, gate, up, down a layer; embeddings, norm, head
        assert case["same_names"] is True and case["tensors"] == 2 * 12 + 3
        assert case["max_abs_diff"] < 1e-6
        assert case["reference_max_abs_diff"] < 1e-5  # adapters off = the base model, sharded
        assert case["grad_norm_after"] > 0  # and on again: the adapters train

    logprobs = {c["implementation"]: c for c in report["logprobs"]}
    assert set(logprobs) == {"naive", "dgpo keep_gib=1", "dgpo keep_gib=0"}
    for case in logprobs.values():
        assert "error" not in case, case
        assert case["max_abs_diff_vs_naive"] < 1e-3

    generation = report["generation"]
    assert "error" not in generation, generation
    assert generation["tokens"] == 2 * 2 * 6  # prompts × n × max_new_tokens (ignore_eos)

    sharing = report["sharing"]
    assert [c["setup"] for c in sharing] == ["checkpointing", "fsdp2+checkpointing"]
    for case in sharing:
        assert "error" not in case, case
        assert case["equal"] is True and case["grad_max_rel_diff"] < 1e-3

    markdown = (tmp_path / "gpu_check.md").read_text()
    for title in ("## Training", "## Sharded LoRA", "## Log-probs", "## Transformers",
                  "## Prompt sharing"):
        assert title in markdown
