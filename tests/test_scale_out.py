"""2-rank CPU runs (gloo) under FSDP, FSDP2 and DDP, compared with single-process runs.

One ``torchrun --nproc_per_node 2`` launch per strategy runs, for each engine (vLLM and
transformers), 2 epochs of the tiny model and then a resume for a third epoch. The same config
on one process (3 epochs) is the reference. Checked per (strategy, engine):

- every epoch's metrics (rewards, losses, regions, grad norm, ...) equal the single-process
  run's: the ranks' rollout shards, the gathered advantages, the sharded mini-batches and the
  (sum, count) metric reductions add up to the same run;
- after each weight sync every rank's engine agrees with the policy's log-probs;
- the first two optimiser steps' full gradients and losses equal those of one process on the
  same global mini-batch (token-mean over the global token count; the second step with a
  non-zero KL penalty and scored behaviour log-probs);
- the checkpoint resumes at epoch 2 and continues the single-process curve;
- under FSDP and FSDP2 only rank 0 reads the weights from disk (the other ranks build the
  models empty and receive rank 0's weights).

The KL penalty is on (``kl_coef > 0``), so the frozen reference model is sharded, scored and
left out of the checkpoints. The FSDP and FSDP2 cases with the transformers engine also
checkpoint activations (as the paper configs do); every case shares prompt passes, so those
recompute layers that read and write the shared KV cache.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dgpo.cli import main
from dgpo.losses import DGPOLoss
from tests.conftest import HAS_VLLM, requires_vllm
from tests.plugins import recompute_step
from tests.scale_out_runs import launch_plan

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "configs" / "tiny_fsdp_cpu.yaml").read_text())
ENGINES = {
    "vllm": {"class_path": "dgpo.rollout.VLLMEngine",
             "init_args": {"dtype": "float32", "kv_cache_space_gib": 0.25, "max_model_len": 256,
                           "progress_bar": False}},
    "transformers": {"class_path": "dgpo.rollout.TransformersEngine"},
}
FSDP = BASE["trainer"]["strategy"]
#: (strategy, engine) -> the strategy config; the checkpoint formats and activation
#: checkpointing (which turns prompt sharing off) differ between engines.
STRATEGIES = {
    ("fsdp", "vllm"): FSDP,  # state_dict_type: full
    # the paper configs' FSDP1 settings: sharded checkpoints, activation checkpointing
    ("fsdp", "transformers"): {**FSDP, "init_args": {
        **FSDP["init_args"], "state_dict_type": "sharded",
        "activation_checkpointing_policy": FSDP["init_args"]["auto_wrap_policy"]}},
    ("fsdp2", "vllm"): {"class_path": "dgpo.strategies.FSDP2Strategy",
                        "init_args": {"save_distributed_checkpoint": False}},
    ("fsdp2", "transformers"): {"class_path": "dgpo.strategies.FSDP2Strategy",
                                "init_args": {"activation_checkpointing": True}},
    ("ddp", "vllm"): "ddp",
    ("ddp", "transformers"): "ddp",
}
#: The k3 KL penalty's coefficient: the reference model is loaded, sharded and scored.
KL_COEF = 0.1
#: Optimiser steps of epoch 0 whose gradients are compared with one process's.
DUMPED_STEPS = [0, 1]
#: Wall-clock metrics differ between any two runs.
TIMING = ("time/", "rollout/tokens_per_second")
CASES = [pytest.param(strategy, engine, id=f"{strategy}-{engine}",
                      marks=[requires_vllm] if engine == "vllm" else [])
         for strategy in ("fsdp", "fsdp2", "ddp") for engine in ENGINES]


def run_config(root: Path, model_path: str, engine: str, strategy: str | None,
               epochs: int) -> Path:
    """The tiny 2-rank config (or, with ``strategy=None``, the same run on one process)."""
    config = copy.deepcopy(BASE)
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(root), max_epochs=epochs)
    trainer["logger"]["init_args"]["save_dir"] = str(root)
    if strategy is None:
        trainer.update(devices=1, strategy="auto")
    else:
        trainer["strategy"] = STRATEGIES[strategy, engine]
    config["engine"] = ENGINES[engine]
    config["rollout"].update(mini_batch_size=4,  # 4 steps per rollout, 2 per rank
                             reward={"class_path": "tests.plugins.DigitFractionReward"})
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(root / "checkpoints"),
                                           "save_last": True}},
                            {"class_path": "tests.plugins.GradientDump",
                             "init_args": {"path": str(root / "steps.pt"),
                                           "steps": DUMPED_STEPS}}]
    # micro-batches of 2: the ranks' shares of deferred π_old differ (e.g. 7 and 5 samples to
    # score), so under FSDP one rank pads its scoring passes to the other's count
    config["model"].update(model_name_or_path=model_path, max_grad_norm=None,  # raw gradients
                           kl_coef=KL_COEF, micro_batch_size=2)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"config-{epochs}-epochs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def epoch_metrics(root: Path, version: int = 0) -> pd.DataFrame:
    frame = pd.read_csv(root / "tiny_fsdp_cpu" / f"version_{version}" / "metrics.csv")
    frame = frame.groupby("epoch").mean()
    return frame[[c for c in frame.columns if not c.startswith(TIMING) and c != "step"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_path):
    """The single-process reference runs (3 epochs), one per engine, made on first use."""
    roots: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in roots:
            root = tmp_path_factory.mktemp(f"single-{engine}")
            main(["fit", "--config", str(run_config(root, tiny_model_path, engine, None, 3))])
            roots[engine] = root
        return roots[engine]

    return get


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_path):
    """One 2-rank launch per strategy: for each engine, fit 2 epochs, then resume to 3."""
    roots: dict[str, dict[str, Path]] = {}

    def get(strategy: str) -> dict[str, Path]:
        if strategy in roots:
            return roots[strategy]
        base = tmp_path_factory.mktemp(f"ranks-{strategy}")
        engines = [e for e in ENGINES if e != "vllm" or HAS_VLLM]
        plan, paths = [], {}
        for engine in engines:
            root = base / engine
            first = run_config(root, tiny_model_path, engine, strategy, 2)
            again = run_config(root, tiny_model_path, engine, strategy, 3)
            plan += [["fit", "--config", str(first)],
                     ["fit", "--config", str(again), "--ckpt_path",
                      str(root / "checkpoints" / "last.ckpt")]]
            paths[engine] = root
        launch_plan(base, plan, timeout=300)
        roots[strategy] = paths
        return paths

    return get


@pytest.mark.parametrize(("strategy", "engine"), CASES)
def test_scale_out_two_ranks_match_one_process(strategy, engine, launched, single):
    ranks, one = launched(strategy)[engine], single(engine)
    got, expected = epoch_metrics(ranks), epoch_metrics(one)
    assert list(got.index) == [0, 1]
    assert set(expected.columns) <= set(got.columns)
    pd.testing.assert_frame_equal(got[expected.columns], expected.loc[[0, 1]], check_exact=False,
                                  rtol=1e-4, atol=1e-6)
    assert (got["rollout/sync_logp_diff_max"] < 1e-3).all(), "an engine missed a weight sync"
    assert got["train/ratio/max"].max() > 1.0, "several steps per rollout move the ratio"
    for name in ("train/region/IN", "train/region/LN", "train/region/HP"):
        assert got[name].between(0, 1).all(), name  # token-weighted fractions, exactly reduced


@pytest.mark.parametrize("step", DUMPED_STEPS)
@pytest.mark.parametrize(("strategy", "engine"), CASES)
def test_scale_out_step_gradient_equals_one_process_on_same_batch(strategy, engine, step,
                                                                  launched, tiny_model_path):
    """Step 0 (π_old deferred where allowed, KL 0) and step 1 (π_old scored, KL > 0)."""
    record = torch.load(launched(strategy)[engine] / "steps.pt", weights_only=False)[step]
    assert record["world_size"] == 2
    # every case shares prompts, the transformers-engine FSDP ones with activation checkpointing
    assert record["shares_prompts"]
    # the first mini-batch's π_old comes from its training pass, under every strategy
    deferred = [record["samples"][i].defer_old_logp for i in record["indices"]]
    assert all(deferred) if step == 0 else not any(deferred)
    loss, kl, expected = recompute_step(record, tiny_model_path, DGPOLoss(), KL_COEF)
    # the step's total: the policy loss plus the KL penalty's term
    assert math.isclose(record["loss"], loss + KL_COEF * kl, rel_tol=1e-4, abs_tol=1e-6)
    assert (kl > 1e-6) == (step > 0), "the reference model is the policy before the first step"
    assert set(record["grads"]) == set(expected)
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(record["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("strategy", "engine"), CASES)
def test_scale_out_checkpoint_resumes_the_same_curve(strategy, engine, launched, single):
    ranks, one = launched(strategy)[engine], single(engine)
    last = ranks / "checkpoints" / "last.ckpt"
    sharded = (strategy, engine) in {("fsdp", "transformers"), ("fsdp2", "transformers")}
    assert last.is_dir() if sharded else last.is_file()
    got, expected = epoch_metrics(ranks, version=1), epoch_metrics(one)
    assert list(got.index) == [2], "the resumed run trains epoch 3, not zero steps"
    pd.testing.assert_frame_equal(got[expected.columns], expected.loc[[2]], check_exact=False,
                                  rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "ddp"])
def test_scale_out_only_rank0_reads_the_weights_when_sharded(strategy, launched):
    base = next(iter(launched(strategy).values())).parent
    reads = [json.loads(line) for line in (base / "weight_reads.jsonl").read_text().splitlines()]
    by_loader = [read["rank"] for read in reads if read["caller"] == "dgpo/loading.py"]
    fits = len(json.loads((base / "plan.json").read_text()))
    # one policy and one reference model per fit on rank 0
    assert by_loader.count(0) == 2 * fits
    assert by_loader.count(1) == (2 * fits if strategy == "ddp" else 0)


@requires_vllm
def test_scale_out_tiny_fsdp_cpu_config_runs_as_documented(tmp_path):
    """``python -m dgpo fit --config configs/tiny_fsdp_cpu.yaml``: Lightning starts rank 1."""
    command = [sys.executable, "-m", "dgpo", "fit", "--config",
               str(REPO / "configs" / "tiny_fsdp_cpu.yaml"), "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger.init_args.save_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    # the quiet console keeps each rank's library lines in its own log
    log = tmp_path / "tiny_fsdp_cpu" / "version_0" / "console.rank1.log"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log.read_text()
    assert (tmp_path / "tiny_fsdp_cpu" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    metrics = epoch_metrics(tmp_path)
    assert (metrics["rollout/sync_logp_diff_max"] < 1e-3).all()


@requires_vllm
def test_scale_out_paper_mixed_precision_runs_on_two_cpu_ranks(tmp_path):
    """The paper configs' FSDP1 precision (bf16 compute, fp32 reduce and buffers), on 2 ranks."""
    paper = yaml.safe_load((REPO / "configs" / "paper" / "r1-distill-qwen-1.5b.yaml").read_text())
    override = {"trainer": {
        "precision": paper["trainer"]["precision"],
        "strategy": {"class_path": "dgpo.strategies.CPUFSDPStrategy", "init_args": {
            "mixed_precision": paper["trainer"]["strategy"]["init_args"]["mixed_precision"]}},
        "callbacks": [*BASE["trainer"]["callbacks"],
                      {"class_path": "tests.plugins.PrecisionProbe",
                       "init_args": {"path": str(tmp_path / "precision")}}]}}
    (tmp_path / "precision.yaml").write_text(yaml.safe_dump(override))
    command = [sys.executable, "-m", "dgpo", "fit", "--config",
               str(REPO / "configs" / "tiny_fsdp_cpu.yaml"), "--config",
               str(tmp_path / "precision.yaml"), "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger.init_args.save_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"precision.rank{rank}").read_text())
        assert (record["param_dtype"], record["reduce_dtype"]) == ("torch.bfloat16",
                                                                   "torch.float32")
        assert record["buffers"]["model.rotary_emb.inv_freq"] == "torch.float32"
    # bf16 compute against the fp32 engine: close, far below the 0.05-nat sync tolerance
    assert (epoch_metrics(tmp_path)["rollout/sync_logp_diff_max"] < 0.05).all()
