"""The CPU FSDP and FSDP2 strategies, and full-weight gathering, on one gloo rank."""

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from dgpo.distributed import full_weights, load_from_rank0, meta_materializer
from dgpo.module import RLVRModule
from dgpo.strategies import (
    CPUFSDPStrategy,
    FSDP2Strategy,
    _full_state_dict_context_in_place,
    check_full_checkpoint_keys,
    strategy_kind,
)


@pytest.fixture
def one_rank(tmp_path):
    """A world-size-1 gloo process group, destroyed afterwards."""
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture
def tiny_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def _assert_same_weights(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_cpu_fsdp_strategy_runs_on_the_cpu_accelerator():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(), logger=False)
    assert strategy_kind(trainer.strategy) == "fsdp1"


def test_cpu_fsdp_strategy_gathers_full_state_dicts_in_place_on_cpu_only():
    strategy = CPUFSDPStrategy()
    strategy.parallel_devices = [torch.device("cpu")]
    original = lightning_fsdp._get_full_state_dict_context
    with strategy._full_state_dict_on_cpu():
        assert lightning_fsdp._get_full_state_dict_context is _full_state_dict_context_in_place
    assert lightning_fsdp._get_full_state_dict_context is original


def test_strategy_kind_names_how_parameters_are_held():
    assert strategy_kind(CPUFSDPStrategy()) == "fsdp1"
    assert strategy_kind(FSDP2Strategy()) == "fsdp2"
    assert strategy_kind(None) == "replicated"


def test_fsdp2_strategy_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        FSDP2Strategy(param_dtype="fp8")


def test_fsdp1_full_weights_gathers_every_unit_with_hf_names(one_rank, tiny_model):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    expected = {name: t.clone() for name, t in tiny_model.state_dict().items()}
    wrapped = FullyShardedDataParallel(tiny_model, device_id=torch.device("cpu"),
                                       use_orig_params=True,
                                       auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}))
    assert len(FullyShardedDataParallel.fsdp_modules(wrapped)) == 3  # root + 2 decoder layers
    _assert_same_weights(dict(full_weights(wrapped)), expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp2_strategy_shards_layers_and_full_weights_gathers_them(one_rank, tiny_model,
                                                                   checkpointing):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    expected = {name: t.clone() for name, t in tiny_model.state_dict().items()}
    strategy = FSDP2Strategy(activation_checkpointing=checkpointing)
    strategy._device_mesh = init_device_mesh("cpu", (1, 1),
                                             mesh_dim_names=("data_parallel", "tensor_parallel"))
    strategy._shard(tiny_model)
    assert isinstance(tiny_model, FSDPModule)
    assert all(isinstance(p, DTensor) for p in tiny_model.parameters())
    _assert_same_weights(dict(full_weights(tiny_model)), expected)


def test_fsdp2_strategy_needs_a_layer_class(one_rank):
    from torch.distributed.device_mesh import init_device_mesh

    strategy = FSDP2Strategy(layer_classes=["NoSuchLayer"])
    strategy._device_mesh = init_device_mesh("cpu", (1, 1),
                                             mesh_dim_names=("data_parallel", "tensor_parallel"))
    with pytest.raises(ValueError, match="found no module of the classes"):
        strategy._shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_module_refuses_a_model_parallel_strategy_that_shards_nothing(tiny_model_path):
    module = RLVRModule(tiny_model_path)
    module.trainer = Trainer(accelerator="cpu", devices=1, logger=False,
                             strategy=ModelParallelStrategy(tensor_parallel_size=1))
    with pytest.raises(ValueError, match="use trainer.strategy: dgpo.strategies.FSDP2Strategy"):
        module.configure_model()


def _empty_tiny_model(tiny_model_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_path),
                                                dtype=torch.float32)


def test_meta_materializer_keeps_tied_weights_tied(tiny_model_path):
    model = _empty_tiny_model(tiny_model_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny model ties them
    materialize = meta_materializer(torch.device("cpu"))
    for module in model.modules():
        materialize(module)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and not any(tensor.is_meta for tensor in tensors)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())
    # Module.to_empty would have untied them: FSDP would then flatten a bigger model than rank 0's
    untied = _empty_tiny_model(tiny_model_path)
    for module in untied.modules():
        module.to_empty(device="cpu", recurse=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_loading_from_rank0_needs_rank0s_weights(one_rank, tiny_model):
    with pytest.raises(ValueError, match="rank 0 must pass the model's full state dict"):
        load_from_rank0(tiny_model, None)


def test_fsdp2_strategy_refuses_an_empty_model_on_rank0(one_rank, tiny_model_path):
    from torch.distributed.device_mesh import init_device_mesh

    strategy = FSDP2Strategy()
    strategy._device_mesh = init_device_mesh("cpu", (1, 1),
                                             mesh_dim_names=("data_parallel", "tensor_parallel"))
    with pytest.raises(ValueError, match="rank 0 holds no weights"):
        strategy._shard(_empty_tiny_model(tiny_model_path))


def test_only_hugging_face_checkpointing_turns_training_prompt_sharing_off(tiny_model_path):
    from dgpo.strategies import _checkpoint_layers

    wrapped = RLVRModule(tiny_model_path)
    wrapped.configure_model()
    assert wrapped.shares_prompts
    _checkpoint_layers(wrapped.policy, (type(wrapped.policy.model.layers[0]),))  # strategies'
    assert wrapped.shares_prompts  # the prompt cache is safe to recompute
    hugging_face = RLVRModule(tiny_model_path, gradient_checkpointing=True)
    hugging_face.configure_model()
    assert not hugging_face.shares_prompts  # it drops the KV cache while training


@pytest.mark.parametrize("checkpointing", ["hugging_face", "wrappers"])
def test_scoring_shares_prompts_even_with_activation_checkpointing(tiny_model_path,
                                                                    checkpointing):
    """No backward pass while scoring, so nothing is recomputed into the shared KV cache."""
    from dgpo.rollout.buffer import RolloutSample
    from dgpo.strategies import _checkpoint_layers

    samples = [RolloutSample(prompt_ids=[5, 6, 7, 8], response_ids=response, advantage=0.0)
               for response in ([9, 10, 11], [12, 13], [14, 15, 16, 17])]
    scores = {}
    for share in (False, True):
        module = RLVRModule(tiny_model_path, share_prompts=share,
                            gradient_checkpointing=checkpointing == "hugging_face")
        module.configure_model()
        if checkpointing == "wrappers":
            _checkpoint_layers(module.policy, (type(module.policy.model.layers[0]),))
        assert module.shares_prompts == (share and checkpointing == "wrappers")
        calls: list[int] = []
        module.policy.get_decoder().register_forward_hook(
            lambda *args, calls=calls: calls.append(1))
        scores[share] = module.score_samples(samples)
        assert len(calls) == (2 if share else 1)  # prompt pass + responses, or one plain pass
        assert module.policy.training
    for shared, plain in zip(scores[True], scores[False], strict=True):
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_full_checkpoint_keys_check_accepts_only_what_the_load_hooks_allow():
    class Frozen(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.policy = torch.nn.Linear(2, 2)  # "policy.weight", "policy.bias"
            self.register_buffer("scratch", torch.zeros(1), persistent=False)  # never saved

    def allow_missing_bias(module, incompatible_keys) -> None:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                             if k != "policy.bias"]

    module = Frozen()
    check_full_checkpoint_keys(module, ["policy.weight", "policy.bias"], "a.ckpt")
    with pytest.raises(RuntimeError, match=r"'a.ckpt' does not fit the model: missing "
                                           r"\['policy.bias'\] \(1 in all\), unexpected \[\]"):
        check_full_checkpoint_keys(module, ["policy.weight"], "a.ckpt")
    module.register_load_state_dict_post_hook(allow_missing_bias)
    check_full_checkpoint_keys(module, ["policy.weight"], "a.ckpt")
    with pytest.raises(RuntimeError, match=r"missing \['policy.weight'\] \(1 in all\), "
                                           r"unexpected \['policy.extra'\] \(1 in all\)"):
        check_full_checkpoint_keys(module, ["policy.extra"], "a.ckpt")
