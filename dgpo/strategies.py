"""Lightning strategies for scaling out: FSDP on CPU processes, and FSDP2 with dgpo's sharding.

- :class:`CPUFSDPStrategy` is Lightning's ``FSDPStrategy`` (FSDP1) made to run on CPU processes
  (gloo), so that the multi-rank tests exercise the same FSDP code path as a GPU run. On GPUs it
  behaves exactly like ``FSDPStrategy``.
- :class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with pure data parallelism over
  all ranks and ``fully_shard`` applied to the policy (and the reference model) for you: each
  decoder layer is a shard unit, the model is the root unit, with optional mixed precision,
  activation checkpointing and CPU offload. It works on GPUs and on CPU (gloo) unchanged.

Both are chosen in the config: ``trainer.strategy.class_path: dgpo.strategies.CPUFSDPStrategy``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.nn import Module
from torch.nn.modules.module import _IncompatibleKeys
from typing_extensions import override

from dgpo.distributed import load_from_rank0
from dgpo.loading import DTYPES


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that also runs on CPU processes (``accelerator: cpu``, gloo).

    Stock ``FSDPStrategy`` refuses the CPU accelerator and, when forced, wraps models with
    ``device_id=None``, which FSDP cannot place on a CPU-only machine. These changes make the
    same FSDP1 code path run on CPU ranks (measured on 1 and 2 gloo ranks with torch 2.13):

    - models are wrapped with ``device_id=torch.device("cpu")`` (both the ``wrap()`` calls in
      ``configure_model`` and the automatic wrapping of a module that wrapped nothing itself);
    - full state dicts (``state_dict_type: full`` checkpoints, saving and loading) are gathered
      with ``offload_to_cpu=False``: Lightning hard-codes ``offload_to_cpu=True``, which
      segfaults when the parameters already live on the CPU (and would be a no-op there anyway).

    On a GPU (any non-CPU root device) these are skipped and the strategy is ``FSDPStrategy``.
    All of ``FSDPStrategy``'s arguments apply (``auto_wrap_policy``,
    ``activation_checkpointing_policy``, ``sharding_strategy``, ``state_dict_type``,
    ``cpu_offload``, ``mixed_precision``, ...). One more difference, on any device: when the
    module has wrapped its models itself (:class:`~dgpo.module.RLVRModule` does, with the
    strategy's ``auto_wrap_policy``), ``FSDPStrategy``'s misleading warning that the
    auto-wrap policy "will be ignored" is not shown.

    Example:
        .. code-block:: yaml

            trainer:
              accelerator: cpu
              devices: 2
              strategy:
                class_path: dgpo.strategies.CPUFSDPStrategy
                init_args:
                  auto_wrap_policy: [transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer]
                  state_dict_type: full
    """

    strategy_name = "fsdp_cpu"

    @contextlib.contextmanager
    @override
    def model_sharded_context(self) -> Iterator[None]:
        if self.root_device.type != "cpu":
            with super().model_sharded_context():
                yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(wrapper_cls=FullyShardedDataParallel, cpu_offload=self.cpu_offload,
                         mixed_precision=self.mixed_precision_config,
                         sharding_strategy=self.sharding_strategy,
                         device_id=torch.device("cpu"), **self.kwargs):
            yield

    @override
    def _setup_model(self, model: Module) -> Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            wrapped = model  # wrapped in configure_model, with the auto-wrap policy
        elif self.root_device.type == "cpu":
            wrapped = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                **self.kwargs)
        else:
            return super()._setup_model(model)
        # The parent sees a wrapped model and only adds activation checkpointing; it would warn
        # that the (already applied) auto-wrap policy is ignored, so hide it during the call.
        policy = self.kwargs.pop("auto_wrap_policy", None)
        try:
            return super()._setup_model(wrapped)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self._full_state_dict_on_cpu():
            return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        with self._full_state_dict_on_cpu():
            return super().optimizer_state(optimizer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        with self._full_state_dict_on_cpu():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    @contextlib.contextmanager
    def _full_state_dict_on_cpu(self) -> Iterator[None]:
        """Gather full state dicts without ``offload_to_cpu`` while on CPU (see the class doc)."""
        if self.root_device.type != "cpu":
            yield
            return
        import lightning.fabric.strategies.fsdp as fabric_fsdp
        import lightning.fabric.strategies.model_parallel as fabric_model_parallel
        import lightning.pytorch.strategies.fsdp as pytorch_fsdp

        modules = (pytorch_fsdp, fabric_fsdp, fabric_model_parallel)
        saved = [getattr(module, "_get_full_state_dict_context", None) for module in modules]
        for module in modules:
            if hasattr(module, "_get_full_state_dict_context"):
                module._get_full_state_dict_context = _full_state_dict_context_in_place
        try:
            yield
        finally:
            for module, original in zip(modules, saved, strict=True):
                if original is not None:
                    module._get_full_state_dict_context = original


def _full_state_dict_context_in_place(module: Module, world_size: int,
                                      rank0_only: bool = True) -> Any:
    """Lightning's full-state-dict context with ``offload_to_cpu=False`` (CPU ranks only)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                         rank0_only=rank0_only))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) data parallelism over every rank, through ``ModelParallelStrategy``.

    Lightning's ``ModelParallelStrategy`` leaves the sharding to the module's ``configure_model``;
    this subclass applies it after ``configure_model`` has loaded the models: every child of the
    LightningModule that holds parameters (the policy, and the reference model when ``kl_coef >
    0``) gets ``fully_shard`` on each of its decoder layers and then on itself (the root unit, so
    calling the policy directly gathers its embeddings and head too). The device mesh is 1-D,
    data parallel over all ``num_nodes × devices`` ranks (no tensor parallelism). A model that
    the other ranks built on the meta device (:class:`~dgpo.module.RLVRModule` does, so that only
    rank 0 reads the checkpoint) is filled with rank 0's weights once sharded.

    Args:
        layer_classes: class names (``"Qwen2DecoderLayer"``) or import paths of the modules that
            become shard units; ``None`` takes the model's ``_no_split_modules`` (its decoder
            layer, for Hugging Face models).
        param_dtype: dtype of the gathered parameters for compute (mixed precision; e.g.
            ``"bfloat16"``), or ``None`` to compute in the parameters' own dtype.
        reduce_dtype: dtype of the gradient reduce-scatter, or ``None`` for ``param_dtype``.
        activation_checkpointing: recompute each shard unit's activations in the backward pass.
        cpu_offload: keep the sharded parameters, gradients and optimiser states in CPU memory
            (GPU only; the optimiser step then runs on the CPU).
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3);
            ``False`` keeps them until the backward (ZeRO-2-like, more memory, less traffic).
        save_distributed_checkpoint: ``True``: each rank writes its shard (a checkpoint folder);
            ``False``: one full checkpoint file assembled on rank 0.
        process_group_backend: ``"nccl"``/``"gloo"``; ``None`` picks the device's default.
        timeout: collective timeout.

    Raises:
        ValueError: for an unknown dtype, or when no module matches ``layer_classes``.

    Example:
        .. code-block:: yaml

            trainer:
              strategy:
                class_path: dgpo.strategies.FSDP2Strategy
                init_args: {param_dtype: bfloat16, reduce_dtype: float32,
                            activation_checkpointing: true}
    """

    strategy_name = "fsdp2"

    def __init__(self, layer_classes: list[str] | None = None,
                 param_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 activation_checkpointing: bool = False, cpu_offload: bool = False,
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {list(DTYPES)} or None, got {value!r}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.layer_classes = layer_classes
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.lightning_module is not None
        for child in self.lightning_module.children():
            if any(True for _ in child.parameters()):
                self._shard(child)
        super().setup(trainer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        # Lightning loads a full checkpoint parameter by parameter over every submodule, not
        # through the module's load_state_dict, whose post-hooks accept what checkpoints leave
        # out: the frozen reference model (detached here, so it is not looked for) and a LoRA
        # policy's frozen base weights (checked against those hooks, then loaded non-strictly).
        module = self.lightning_module
        with _detached(module, "reference"):
            path = Path(self.broadcast(checkpoint_path))
            if module is None or not module.strict_loading or not path.is_file():
                return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
            check_full_checkpoint_keys(module, saved["state_dict"].keys(), str(path))
            del saved
            module.strict_loading = False
            try:
                return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            finally:
                module.strict_loading = True

    def _shard(self, model: Module) -> None:
        """``fully_shard`` every layer of ``model``, then ``model`` itself (idempotent)."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            fully_shard,
        )

        if isinstance(model, FSDPModule):
            return
        names = self.layer_classes or list(getattr(model, "_no_split_modules", None) or [])
        wanted = {name.rsplit(".", 1)[-1] for name in names}
        layers = [module for module in model.modules() if type(module).__name__ in wanted]
        if not layers:
            raise ValueError(f"FSDP2Strategy found no module of the classes {sorted(wanted)} in "
                             f"{type(model).__name__}; set layer_classes to its decoder layer")
        if self.activation_checkpointing:
            _checkpoint_layers(model, tuple({type(layer) for layer in layers}))
            layers = [module for module in model.modules() if type(module).__name__ in wanted]
        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"],
                                  "reshard_after_forward": self.reshard_after_forward}
        if self.param_dtype is not None or self.reduce_dtype is not None:
            param = DTYPES[self.param_dtype] if self.param_dtype else None
            reduce = DTYPES[self.reduce_dtype] if self.reduce_dtype else param
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        # A model that the non-zero ranks built on the meta device gets rank 0's weights.
        mesh = kwargs["mesh"]
        empty = any(tensor.is_meta for tensor in model.parameters())
        flags = torch.tensor([float(empty)], device=mesh.device_type)
        torch.distributed.all_reduce(flags, group=mesh.get_group())
        from_rank0 = bool(flags.item() > 0)
        if empty and torch.distributed.get_rank() == 0:
            raise ValueError("rank 0 holds no weights (its model is on the meta device): only the "
                             "other ranks may build the model empty")
        full_state = model.state_dict() if from_rank0 and not empty else None
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        if from_rank0:
            if empty:
                model.to_empty(device=mesh.device_type)
            load_from_rank0(model, full_state)


def check_full_checkpoint_keys(module: Module, saved: Iterable[str], source: str) -> None:
    """Check a full checkpoint's state-dict keys against what ``module`` loads, as strict loading.

    A key that Lightning's parameter-by-parameter loading of a full checkpoint looks for (every
    parameter and persistent buffer) may be missing only when ``module``'s own
    ``load_state_dict`` post-hooks accept its absence (e.g. a LoRA policy's frozen base
    weights, :func:`dgpo.lora.allow_missing_base_weights`); no saved key may be unknown.

    Raises:
        RuntimeError: naming the first missing or unexpected keys and ``source``.
    """
    expected = []
    for prefix, submodule in module.named_modules():
        tensors = itertools.chain(submodule.named_buffers(recurse=False),
                                  submodule.named_parameters(recurse=False))
        expected += [f"{prefix}.{name}" if prefix else name for name, _ in tensors
                     if name not in submodule._non_persistent_buffers_set]
    saved = set(saved)
    result = _IncompatibleKeys([key for key in expected if key not in saved],
                               sorted(saved - set(expected)))
    for hook in module._load_state_dict_post_hooks.values():  # they may drop accepted keys
        hook(module, result)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {source!r} does not fit the model: missing "
                           f"{result.missing_keys[:5]} ({len(result.missing_keys)} in all), "
                           f"unexpected {result.unexpected_keys[:5]} "
                           f"({len(result.unexpected_keys)} in all)")


@contextlib.contextmanager
def _detached(module: Module | None, name: str) -> Iterator[None]:
    """Set the child module ``name`` of ``module`` to ``None`` for the duration."""
    child = None if module is None else module._modules.get(name)
    if child is None:
        yield
        return
    module._modules[name] = None
    try:
        yield
    finally:
        module._modules[name] = child


def _checkpoint_layers(model: Module, classes: tuple[type, ...]) -> None:
    """Wrap every module of ``classes`` in a non-reentrant activation-checkpoint wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                       checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: isinstance(module, classes))


def check_module_sharding(strategy: Any) -> None:
    """Refuse a ``ModelParallelStrategy`` that leaves the sharding to the module.

    dgpo's module does not shard itself for ``ModelParallelStrategy`` (it would train a replica
    per rank with no gradient sync); :class:`FSDP2Strategy` does the sharding.

    Raises:
        ValueError: for any ``ModelParallelStrategy`` but :class:`FSDP2Strategy`.
    """
    if isinstance(strategy, ModelParallelStrategy) and not isinstance(strategy, FSDP2Strategy):
        raise ValueError(f"{type(strategy).__name__} leaves the sharding to the module; use "
                         "trainer.strategy: dgpo.strategies.FSDP2Strategy (FSDP2 over all ranks) "
                         "instead")


def strategy_kind(strategy: Any) -> Literal["fsdp1", "fsdp2", "replicated"]:
    """How a Lightning strategy holds the policy's parameters.

    ``"fsdp1"``: wrapped by ``FullyShardedDataParallel`` (``FSDPStrategy`` and subclasses);
    ``"fsdp2"``: DTensor shards (``ModelParallelStrategy`` and subclasses); ``"replicated"``: a
    full copy on every rank (single device, DDP).
    """
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    return "replicated"

