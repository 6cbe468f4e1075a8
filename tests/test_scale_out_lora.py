"""LoRA on 2 CPU ranks (gloo) under FSDP1 and FSDP2, compared with the same run on one process.

One ``torchrun --nproc_per_node 2`` launch runs, for each strategy, 2 epochs of the tiny model
with ``model.lora`` and a KL penalty (the reference is the policy with its adapters off), then a
resume for a third epoch; one process runs the same config for 3 epochs. FSDP1 uses the paper
configs' settings (sharded checkpoints, activation checkpointing), FSDP2 full checkpoint files
(whose loading must accept the frozen base weights' absence). Checked per strategy:

- every epoch's metrics and the first two optimiser steps' gradients equal one process's, and
  only the adapters receive gradients (FSDP1 shows zeros for the frozen part of its flat
  parameters);
- after training the frozen base weights are the initial model's, bit for bit, and the adapters
  equal one process's;
- checkpoints hold the adapters and their optimiser state only; the resume continues the
  one-process curve; the FSDP2 file exports to a merged Hugging Face folder;
- only rank 0 reads the weights (rank 1 applies the adapters to its empty model before sharding).
"""

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from dgpo.cli import main
from dgpo.lora import LORA_MARK, PEFT_PREFIX
from tests.scale_out_runs import launch_plan
from tests.test_cli import initial_weights
from tests.test_scale_out import STRATEGIES, epoch_metrics, run_config

LORA = {"r": 4, "alpha": 8.0}
#: The FSDP1 case: sharded checkpoints and activation checkpointing (the paper configs');
#: the FSDP2 case: one full checkpoint file.
LORA_STRATEGIES = {
    "fsdp": STRATEGIES["fsdp", "transformers"],
    "fsdp2": {"class_path": "dgpo.strategies.FSDP2Strategy",
              "init_args": {"save_distributed_checkpoint": False}},
}


def lora_config(root: Path, model_path: str, strategy: str | None, epochs: int) -> Path:
    """The scale-out config with LoRA (transformers engine); ``strategy=None``: one process."""
    path = run_config(root, model_path, "transformers", None, epochs)
    config = yaml.safe_load(path.read_text())
    if strategy is not None:
        config["trainer"].update(devices=2, strategy=copy.deepcopy(LORA_STRATEGIES[strategy]))
    config["model"]["lora"] = LORA
    config["trainer"]["callbacks"].append({"class_path": "tests.plugins.WeightsDump", "init_args":
                                          {"path": str(root / f"weights-{epochs}.pt")}})
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """``{"single": root, "fsdp": root, "fsdp2": root}``: one process, then one 2-rank launch."""
    base = tmp_path_factory.mktemp("lora-scale-out")
    single = base / "single"
    main(["fit", "--config", str(lora_config(single, tiny_model_path, None, 3))])
    plan = []
    for strategy in LORA_STRATEGIES:
        root = base / strategy
        plan += [["fit", "--config", str(lora_config(root, tiny_model_path, strategy, 2))],
                 ["fit", "--config", str(lora_config(root, tiny_model_path, strategy, 3)),
                  "--ckpt_path", str(root / "checkpoints" / "last.ckpt")]]
    launch_plan(base, plan, timeout=600)
    return {"single": single, **{strategy: base / strategy for strategy in LORA_STRATEGIES}}


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


@pytest.mark.parametrize("strategy", list(LORA_STRATEGIES))
def test_scale_out_lora_two_ranks_match_one_process(strategy, runs):
    ranks, one = runs[strategy], runs["single"]
    got, expected = epoch_metrics(ranks), epoch_metrics(one)
    assert list(got.index) == [0, 1]
    pd.testing.assert_frame_equal(got[expected.columns], expected.loc[[0, 1]], check_exact=False,
                                  rtol=1e-4, atol=1e-6)
    assert (got["rollout/sync_logp_diff_max"] < 1e-3).all(), "an engine missed a weight sync"
    assert (got["train/kl"] > 1e-6).all(), "the adapters-off reference differs after a step"
    steps = torch.load(ranks / "steps.pt", weights_only=False)
    reference = torch.load(one / "steps.pt", weights_only=False)
    for step, record in steps.items():
        assert record["world_size"] == 2
        expected_grads = reference[step]["grads"]
        assert expected_grads and all(LORA_MARK in name for name in expected_grads)
        assert any(g.abs().sum() > 0 for g in expected_grads.values())
        for name, grad in record["grads"].items():
            if name in expected_grads:
                torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6,
                                           msg=name)
            else:  # FSDP1 flat parameters hold frozen and trainable weights: zeros for these
                assert LORA_MARK not in name and not grad.any(), name
        assert set(expected_grads) <= set(record["grads"])


@pytest.mark.parametrize("strategy", list(LORA_STRATEGIES))
def test_scale_out_lora_base_stays_frozen_and_adapters_match(strategy, runs, tiny_model_path):
    initial = initial_weights(tiny_model_path)
    expected = torch.load(runs["single"] / "weights-3.pt")
    for epochs in (2, 3):
        weights = torch.load(runs[strategy] / f"weights-{epochs}.pt")
        assert weights.keys() == expected.keys()
        base = {_base_name(n): t for n, t in weights.items() if LORA_MARK not in n}
        assert base.keys() == initial.keys()
        for name, tensor in base.items():
            torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=name)
    adapters = [n for n in weights if LORA_MARK in n]
    assert any(n.endswith(".lora_B.default.weight") and weights[n].any() for n in adapters)
    for name in adapters:  # after the resumed third epoch
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", list(LORA_STRATEGIES))
def test_scale_out_lora_checkpoint_holds_adapters_and_resumes(strategy, runs, tmp_path):
    ranks, one = runs[strategy], runs["single"]
    got, expected = epoch_metrics(ranks, version=1), epoch_metrics(one)
    assert list(got.index) == [2], "the resumed run trains epoch 3, not zero steps"
    pd.testing.assert_frame_equal(got[expected.columns], expected.loc[[2]], check_exact=False,
                                  rtol=1e-4, atol=1e-6)
    last = ranks / "checkpoints" / "last.ckpt"
    weights = torch.load(ranks / "weights-3.pt")
    adapters = {f"policy.{n}" for n in weights if LORA_MARK in n}
    if strategy == "fsdp":  # a folder of shards: read the names it holds
        assert last.is_dir()
        keys = list(FileSystemReader(str(last)).read_metadata().state_dict_metadata)
        assert {k.removeprefix("model.") for k in keys if k.startswith("model.")} == adapters
        moments = {k for k in keys if k.startswith("optimizer_0.state.")}
        assert moments and all(LORA_MARK in k for k in moments)
        return
    checkpoint = torch.load(last, weights_only=False)
    assert set(checkpoint["state_dict"]) == adapters
    for name, tensor in checkpoint["state_dict"].items():
        torch.testing.assert_close(tensor, weights[name.removeprefix("policy.")], rtol=0, atol=0)
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(adapters)
    # `dgpo export`: W + alpha / r · B @ A per adapted layer, written out here
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(last), str(tmp_path / "merged")])
    assert exit_info.value.code == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    scale = LORA["alpha"] / LORA["r"]
    merged = {_base_name(n): t for n, t in weights.items() if LORA_MARK not in n}
    for name in [n for n in weights if n.endswith(".lora_A.default.weight")]:
        owner = name.removesuffix(".lora_A.default.weight")
        delta = scale * weights[f"{owner}.lora_B.default.weight"] @ weights[name]
        merged[f"{_base_name(owner)}.weight"] = weights[f"{owner}.base_layer.weight"] + delta
    assert exported.keys() == merged.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_scale_out_lora_only_rank0_reads_the_weights(runs):
    base = runs["fsdp"].parent
    reads = [json.loads(line) for line in (base / "weight_reads.jsonl").read_text().splitlines()]
    by_loader = [read["rank"] for read in reads if read["caller"] == "dgpo/loading.py"]
    fits = len(json.loads((base / "plan.json").read_text()))
    # one policy per fit on rank 0, no reference model: the adapters-off policy is the reference
    assert by_loader == [0] * fits
