"""The scale-out helpers: shards, reductions, full weights, mini-batch slices, gloo at exit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgpo.distributed import (
    TokenMeans,
    all_gather_objects,
    call_through,
    clean_name,
    concat_reward_outputs,
    full_weights,
    reduce_reward_metrics,
    shard_bounds,
)
from dgpo.rewards import RewardOutput
from dgpo.rollout import RolloutCallback, TransformersEngine, VLLMEngine
from dgpo.rollout.buffer import MiniBatchSampler, RolloutBuffer, RolloutSample
from dgpo.rollout.vllm_engine import _by_layer, _with_tied_head


def test_shard_bounds_splits_evenly_and_rejects_uneven():
    assert [shard_bounds(12, 3, i) for i in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="10 prompts cannot be split evenly over 4"):
        shard_bounds(10, 4, 0, "prompts")


def test_all_gather_objects_on_one_rank_is_the_object():
    assert all_gather_objects({"a": 1}, world_size=1) == [{"a": 1}]


def test_reduce_reward_metrics_follows_declared_reductions():
    # "f1" would have been summed by the old name-suffix rule; its declared "mean" wins
    how = {"f1": "mean", "timeouts": "sum", "longest": "max", "shortest": "min"}
    per_rank = [({"f1": 0.5, "timeouts": 1.0, "longest": 9.0, "shortest": 2.0}, how, 4),
                ({"f1": 0.0, "timeouts": 2.0, "longest": 7.0, "shortest": 1.0}, how, 12)]
    merged = reduce_reward_metrics(per_rank)
    # f1: (0.5·4 + 0·12) / 16 = 2 / 16, the value one rank would compute on all 16 samples
    assert merged == {"f1": 0.125, "timeouts": 3.0, "longest": 9.0, "shortest": 1.0}


def test_reduce_reward_metrics_one_rank_is_identity_and_missing_metrics_are_absent():
    how = {"f1": "mean", "n": "sum"}
    assert reduce_reward_metrics([({"f1": 0.3, "n": 5.0}, how, 5)]) == {"f1": 0.3, "n": 5.0}
    merged = reduce_reward_metrics([({"f1": 0.3}, how, 5), ({"f1": 0.6, "n": 1.0}, how, 10)])
    assert merged == pytest.approx({"f1": (0.3 * 5 + 0.6 * 10) / 15, "n": 1.0})
    assert reduce_reward_metrics([({"f1": 0.2}, how, 0), ({"f1": 0.4}, how, 0)]) == {
        "f1": pytest.approx(0.3)}


@pytest.mark.parametrize(
    ("per_rank", "message"),
    [
        ([({"f1": 1.0}, {}, 1)], r"reward metric 'f1' has no declared reduction"),
        ([({"f1": 1.0}, {"f1": "avg"}, 1)], r"reduction 'avg' of reward metric 'f1' is not one"),
        ([({"f1": 1.0}, {"f1": "mean"}, 1), ({"f1": 1.0}, {"f1": "sum"}, 1)],
         r"reward metric 'f1' is declared 'sum' on one rank and 'mean' on another"),
    ],
)
def test_reduce_reward_metrics_bad_reductions_raise(per_rank, message):
    with pytest.raises(ValueError, match=message):
        reduce_reward_metrics(per_rank)


def test_concat_reward_outputs_joins_samples_and_reduces_metrics() -> None:
    first = RewardOutput([1.0], [{"s": "a"}], {"acc": 1.0, "n": 1.0, "worst": 3.0},
                         {"n": "sum", "worst": "max"}, [True])
    second = RewardOutput([0.0, 0.0, 1.0], [{"s": "b"}, {"s": "c"}, {"s": "d"}],
                          {"acc": 1 / 3, "n": 3.0, "worst": 7.0}, {"n": "sum", "worst": "max"},
                          [False, False, True])
    whole = concat_reward_outputs([first, second])
    assert whole.scores == [1.0, 0.0, 0.0, 1.0]
    assert [d["s"] for d in whole.details] == ["a", "b", "c", "d"]
    assert whole.correct == [True, False, False, True]
    # accuracy over the 4 samples, as one rank would compute it: 2 / 4
    assert whole.metrics == pytest.approx({"acc": 0.5, "n": 4.0, "worst": 7.0})
    partial = concat_reward_outputs([first, RewardOutput([0.0])])  # a part without details
    assert partial.details == [] and partial.correct is None


def test_token_means_reduce_sums_and_counts_not_means():
    ranks = [TokenMeans(), TokenMeans()]
    ranks[0].update("train/ratio/mean", torch.tensor(1.0), 1)  # 1 token
    ranks[1].update("train/ratio/mean", torch.tensor(2.0), 3)  # 3 tokens
    ranks[1].update("train/ratio/mean", torch.tensor(4.0), 1)
    # what torchmetrics' sync does on every rank: sum the (value·weight, weight) states
    ranks[0].means["train/ratio/mean"].merge_state(ranks[1].means["train/ratio/mean"])
    means = ranks[0].compute()
    assert means["train/ratio/mean"].item() == pytest.approx((1 + 6 + 4) / 5)
    assert ranks[0].compute() == {}, "compute starts a new epoch"
    nan = TokenMeans()
    nan.update("train/entropy", torch.tensor(float("nan")), 2)
    assert torch.isnan(nan.compute()["train/entropy"]), "a NaN is reported, never dropped"


def test_clean_name_removes_wrapper_parts():
    name = "model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert clean_name(name) == "model.layers.0.mlp.up_proj.weight"


def test_full_weights_of_a_plain_module_is_its_state_dict():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    got = dict(full_weights(module))
    assert list(got) == list(module.state_dict())
    assert all(torch.equal(got[k], v) for k, v in module.state_dict().items())


class _Wrapper(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_call_through_runs_the_function_inside_the_wrapper_forward():
    inner = torch.nn.Linear(2, 2)
    wrapper = _Wrapper(inner)
    assert call_through(wrapper, inner, lambda: "done") == "done"
    assert wrapper.calls == 1
    assert "forward" not in vars(inner), "the module's own forward is back"
    assert inner(torch.ones(1, 2)).shape == (1, 2)


def _filled_buffer(world_size: int, rank: int) -> RolloutBuffer:
    buffer = RolloutBuffer()
    buffer.configure(16, 8, ppo_epochs=2, seed=3, rank=rank, world_size=world_size)
    buffer.fill([RolloutSample([1], [2], advantage=0.0) for _ in range(16)], epoch=1)
    return buffer


def test_mini_batch_sampler_ranks_split_each_single_process_mini_batch():
    single = list(MiniBatchSampler(_filled_buffer(1, 0)))
    parts = [list(MiniBatchSampler(_filled_buffer(2, rank))) for rank in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single) == 4
    for step, batch in enumerate(single):
        assert parts[0][step] + parts[1][step] == batch
    assert list(MiniBatchSampler(_filled_buffer(2, 1)).global_batches()) == single


def test_rollout_buffer_rejects_a_mini_batch_that_ranks_cannot_split():
    with pytest.raises(ValueError, match="mini_batch_size=6 sequences cannot be split evenly "
                                         "over 4 ranks"):
        RolloutBuffer().configure(12, 6, world_size=4)


def test_rollout_callback_shards_whole_groups_by_engine():
    callback = RolloutCallback(TransformersEngine(), n=2, rollout_batch_size=6, mini_batch_size=4)
    callback._shard_prompts(rank=2, world_size=3)
    assert (callback._engines, callback._engine_index) == (3, 2)  # prompts [4, 6) of 6
    with pytest.raises(ValueError, match="rollout_batch_size=6 prompts cannot be split evenly "
                                         "over 4 rollout engines"):
        callback._shard_prompts(rank=0, world_size=4)


def test_rollout_callback_counts_tensor_parallel_ranks_as_one_engine():
    engine = VLLMEngine("builtin:tiny-qwen2", tensor_parallel_size=2)
    assert engine.ranks_per_engine(world_size=1) == 1
    assert engine.ranks_per_engine(world_size=8) == 2
    callback = RolloutCallback(engine, n=2, rollout_batch_size=8, mini_batch_size=4)
    callback._shard_prompts(rank=5, world_size=8)  # engines of ranks (0,1) (2,3) (4,5) (6,7)
    assert (callback._engines, callback._engine_index) == (4, 2)  # prompts [4, 6) of 8
    with pytest.raises(ValueError, match="6 ranks cannot be split into rollout engines of 4"):
        RolloutCallback(VLLMEngine("builtin:tiny-qwen2", tensor_parallel_size=4), n=2,
                        rollout_batch_size=8, mini_batch_size=4)._shard_prompts(0, 6)


def test_vllm_weight_stream_checks_each_layer_and_sends_a_tied_head_once():
    def names(prefix: str, parts: list[str]) -> list[tuple[str, torch.Tensor]]:
        return [(f"{prefix}.{part}.weight", torch.zeros(1)) for part in parts]

    stream = (names("model", ["embed_tokens"])
              + names("model.layers.0.self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"])
              + names("model.layers.1.mlp", ["gate_proj", "up_proj", "down_proj"])
              + names("model", ["norm"]) + [("lm_head.weight", torch.zeros(1))])
    sent = [name for name, _ in _by_layer(_with_tied_head(stream, tied=True))]
    assert sent[:2] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert sent.count("lm_head.weight") == 1 and len(sent) == len(stream)
    partial = names("model.layers.0.self_attn", ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="v_proj"):
        list(_by_layer(partial))


def test_release_process_group_ends_gloo_threads_before_exit(tmp_path):
    """The cause of the SIGABRT at the end of 2-rank runs: gloo threads alive at exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(port), str(Path(__file__).parent / "gloo_release.py"), str(tmp_path / "counts")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"counts.rank{rank}").read_text())
        assert counts["working"] > counts["start"], "gloo runs collectives on threads of its own"
        assert counts["dropped"] == counts["working"], "the model's cycle keeps them alive"
        assert counts["released"] == counts["start"], counts  # all joined, Python still alive
        assert counts["initialized"] is False
