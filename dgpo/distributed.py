"""Helpers for running the RL loop on several ranks.

- which prompts a rank generates for (:func:`shard_bounds`), and gathering every rank's rollout
  (:func:`all_gather_objects`);
- metrics reduced from per-rank (sum, count) pairs, never averages of averages
  (:func:`reduce_reward_metrics`);
- the policy's full weights, gathered one shard unit (FSDP1) or one parameter (FSDP2) at a time,
  so the whole model never exists twice in memory (:func:`full_weights`), and the reverse at
  start-up: rank 0's weights streamed into a model that the other ranks built empty
  (:func:`load_from_rank0`);
- running a function inside a sharded model's ``forward`` (:func:`call_through`), so that FSDP
  gathers the parameters the model's root unit holds (embeddings, final norm, LM head) for code
  that uses the model's parts directly (:func:`dgpo.logprobs.sequence_logprobs`);
- ending the process group before the interpreter exits (:func:`release_process_group`).

Every function is a no-op (or the plain single-process computation) on one rank.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn import Module

T = TypeVar("T")

#: Module-name parts that wrappers insert and Hugging Face names do not have.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: Reward metrics whose name ends like this are means over samples; the others are counts.
MEAN_SUFFIXES = ("accuracy", "fraction", "mean", "rate")


def shard_bounds(total: int, parts: int, index: int, what: str = "items") -> tuple[int, int]:
    """The ``[start, stop)`` range of part ``index`` when ``total`` items split in ``parts``.

    Raises:
        ValueError: when ``parts`` does not divide ``total``.

    Example:
        >>> shard_bounds(8, 2, 1)
        (4, 8)
    """
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts} does not exist")
    if total % parts:
        raise ValueError(f"{total} {what} cannot be split evenly over {parts} parts")
    size = total // parts
    return index * size, (index + 1) * size


def all_gather_objects(obj: T, world_size: int) -> list[T]:
    """Every rank's ``obj`` in rank order (``[obj]`` on one rank); a collective call."""
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def reduce_reward_metrics(per_rank: Sequence[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Combine each rank's reward metrics (and its sample count) into global ones.

    A metric whose name ends in ``accuracy``, ``fraction``, ``mean`` or ``rate`` is a mean over
    the rank's samples and is combined as ``Σ value·count / Σ count``; any other metric is a
    count (``samples``, ``timeouts``, ...) and is summed. A metric missing on some rank counts
    as absent there.

    Example:
        >>> reduce_reward_metrics([({"accuracy": 0.5, "timeouts": 1.0}, 4),
        ...                        ({"accuracy": 0.0, "timeouts": 2.0}, 12)])
        {'accuracy': 0.125, 'timeouts': 3.0}
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics, count in per_rank:
        for name, value in metrics.items():
            mean = name.endswith(MEAN_SUFFIXES)
            sums[name] = sums.get(name, 0.0) + float(value) * (count if mean else 1)
            counts[name] = counts.get(name, 0) + count
    return {name: (total / max(counts[name], 1) if name.endswith(MEAN_SUFFIXES) else total)
            for name, total in sums.items()}


class TokenMeans:
    """Token-weighted means accumulated over an epoch and reduced over ranks as (sum, count).

    Lightning's ``sync_dist`` of a ``batch_size``-weighted mean averages an integer
    ``cumulated_batch_size`` over ranks and truncates it (gloo), so its epoch values can be off
    (a fraction of 1.004); this keeps float64 sums and counts and reduces them exactly.

    Example:
        >>> means = TokenMeans()
        >>> means.update("train/ratio/mean", torch.tensor(1.0), 3)
        >>> means.update("train/ratio/mean", torch.tensor(2.0), 1)
        >>> means.compute(lambda pairs: pairs)
        {'train/ratio/mean': tensor(1.2500)}
    """

    def __init__(self) -> None:
        self._pairs: dict[str, Tensor] = {}

    def update(self, name: str, value: Tensor, count: int) -> None:
        """Add ``count`` tokens whose mean is ``value``."""
        pair = self._pairs.get(name)
        if pair is None:
            pair = self._pairs[name] = torch.zeros(2, dtype=torch.float64, device=value.device)
        pair[0] += value.detach().double() * count
        pair[1] += count

    def compute(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The means over all ranks, then start over (a collective when ``reduce_sum`` is one).

        Args:
            reduce_sum: sums a tensor over the ranks (``strategy.reduce(t, reduce_op="sum")``).
        """
        names = sorted(self._pairs)
        if not names:
            return {}
        pairs = reduce_sum(torch.stack([self._pairs[name] for name in names]))
        self._pairs = {}
        return {name: (total / count.clamp(min=1)).float()
                for name, (total, count) in zip(names, pairs, strict=True)}


def clean_name(name: str) -> str:
    """A parameter name without the parts FSDP, checkpoint and compile wrappers add."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


# ------------------------------------------------------------------------------- full weights
def full_weights(model: Module) -> Iterator[tuple[str, Tensor]]:
    """The full (unsharded) tensors of ``model``'s state dict by name, one unit at a time.

    Args:
        model: the policy: an FSDP1 root unit, an FSDP2-sharded module, or a plain module.

    Yields:
        ``(name, tensor)`` with Hugging Face names. Under FSDP1 each shard unit (the root's own
        embeddings, norm and LM head, then each decoder layer) is gathered with
        ``summon_full_params`` and its tensors are copied out before the next unit is gathered;
        under FSDP2 each DTensor is gathered with ``full_tensor()``; otherwise the tensors are
        the module's own (no copy). Every rank must consume the iterator to the end, in step:
        the gathers are collectives.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        yield from _fsdp1_full_weights(model)
        return
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            if tensor.device.type == "cpu" and torch.cuda.is_available():  # CPU-offloaded shards
                tensor = tensor.to(torch.cuda.current_device())
            tensor = tensor.full_tensor()
        yield clean_name(name), tensor.detach()


def _fsdp1_full_weights(root: Module) -> Iterator[tuple[str, Tensor]]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Pre-order: the root comes first, so FSDP sets it up as the root before any other unit is
    # used (a unit used first would take itself for the root).
    units = [(clean_name(name), unit) for name, unit in root.named_modules()
             if isinstance(unit, FSDP)]
    for unit_name, unit in units:
        base = f"{unit_name}." if unit_name else ""
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            # clone: the gathered storage is freed when the context exits
            tensors = [(name, tensor.detach().clone())
                       for name, tensor in _unit_tensors(unit, base)]
        yield from tensors
        del tensors


def _unit_tensors(unit: Module, base: str, buffers: bool = True) -> Iterator[tuple[str, Tensor]]:
    """Parameters and persistent buffers held by an FSDP1 unit itself, not by nested units."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def visit(module: Module, path: str) -> Iterator[tuple[str, Tensor]]:
        for name, param in module._parameters.items():
            if param is not None and "flat_param" not in name:
                yield clean_name(path + name), param
        for name, buffer in module._buffers.items() if buffers else ():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield clean_name(path + name), buffer
        for name, child in module._modules.items():
            if child is not None and not isinstance(child, FSDP):
                yield from visit(child, f"{path}{name}.")

    return visit(unit, base)


# ----------------------------------------------------------------------- loading from rank 0
def load_from_rank0(model: Module, full_state: dict[str, Tensor] | None) -> None:
    """Fill a sharded ``model`` with rank 0's weights; the other ranks built it on the meta device.

    Only rank 0 reads the checkpoint, so a node holds one copy of the full model in CPU memory
    instead of one per rank (59 GB instead of 8 × 59 GB for a 14B model in float32). A
    collective: every rank calls it once the model is sharded.

    Args:
        model: an FSDP1 root unit or an FSDP2-sharded module whose parameters are materialised
            (real values on rank 0's shards; uninitialised elsewhere).
        full_state: on rank 0, the model's ``state_dict()`` taken before sharding (its own
            tensors, no copy); ``None`` on the other ranks.

    Under FSDP1 each shard unit is gathered in turn with ``summon_full_params`` (one unit's full
    parameters at a time), rank 0 writes the full values into it and broadcasts them, and the
    write-back keeps each rank's shard. Under FSDP2 ``set_model_state_dict`` broadcasts tensor by
    tensor (``broadcast_from_rank0``). Buffers are not sharded: they are broadcast whole, which
    also fills those that ``state_dict`` leaves out (the rotary ``inv_freq``).

    Raises:
        ValueError: on rank 0 without ``full_state``.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    rank = torch.distributed.get_rank()
    if rank == 0 and full_state is None:
        raise ValueError("rank 0 must pass the model's full state dict to load_from_rank0")
    if isinstance(model, FullyShardedDataParallel):
        _fsdp1_load_from_rank0(model, full_state)
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(model, full_state or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def meta_materializer(device: torch.device) -> Callable[[Module], None]:
    """An FSDP1 ``param_init_fn``: a module's own meta tensors, allocated on ``device``.

    The new tensors are uninitialised (:func:`load_from_rank0` fills them). Tied parameters
    (a language model's input embedding and LM head) stay one parameter: ``Module.to_empty``
    would make each module its own copy, so that FSDP would flatten a larger model on these
    ranks than on rank 0.
    """
    made: dict[int, tuple[Tensor, torch.nn.Parameter]] = {}  # keeps the meta tensor alive

    def materialize(module: Module) -> None:
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    new = torch.nn.Parameter(torch.empty_like(param, device=device),
                                             requires_grad=param.requires_grad)
                    made[id(param)] = (param, new)
                module._parameters[name] = made[id(param)][1]
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)

    return materialize


def _fsdp1_load_from_rank0(root: Module, full_state: dict[str, Tensor] | None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [(clean_name(name), unit) for name, unit in root.named_modules()
             if isinstance(unit, FSDP)]
    for unit_name, unit in units:
        base = f"{unit_name}." if unit_name else ""
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for name, tensor in _unit_tensors(unit, base, buffers=False):
                if full_state is not None:
                    tensor.data.copy_(full_state[name])
                torch.distributed.broadcast(tensor.data, src=0)


# ---------------------------------------------------------------------------- root forward
def call_in_forward(model: Module, function: Callable[[Module], T]) -> T:
    """``function(inner)`` on the module ``model`` computes with, inside ``model``'s forward.

    For an FSDP1 unit ``inner`` is the wrapped module, for an FSDP2-sharded module the module
    itself; their forward gathers the parameters the unit holds itself (embeddings, final norm,
    LM head), which code that uses the model's parts directly (:mod:`dgpo.logprobs`) needs. A
    plain module is simply passed to ``function``.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        inner = model.module
        return call_through(model, inner, lambda: function(inner))
    if isinstance(model, FSDPModule):
        return call_through(model, model, lambda: function(model))
    return function(model)


def call_through(wrapper: Module, module: Module, function: Callable[[], T]) -> T:
    """Run ``function()`` inside ``wrapper``'s forward, where ``wrapper`` wraps ``module``.

    ``wrapper`` is an FSDP1 unit and ``module`` the module it wraps, or an FSDP2-sharded module
    and ``module`` itself: its forward hooks gather the parameters it holds, and register the
    backward hooks on the outputs (Lightning calls ``training_step`` through a wrapper the same
    way). ``function`` takes no arguments (FSDP would move or copy them).
    """
    patched = "forward" in vars(module)
    original = vars(module).get("forward")

    def restore() -> None:
        if patched:
            module.forward = original  # type: ignore[method-assign]  # the caller's own patch
        else:
            vars(module).pop("forward", None)

    def forward(*args: Any, **kwargs: Any) -> T:
        restore()  # the real forward is back while the work runs
        return function()

    module.forward = forward  # type: ignore[method-assign]  # redirected for one call
    try:
        return wrapper()
    finally:
        restore()


# ------------------------------------------------------------------------------- shutdown
def release_process_group() -> None:
    """Destroy the default process group and let its threads end while Python is still alive.

    Gloo runs each process group's collectives on threads of its own (two workers and a
    transport loop), which ``destroy_process_group`` leaves running: they end only when the
    C++ process group is freed, and an FSDP or DDP module (a reference cycle) holds it until the
    garbage collector runs, at interpreter exit. A worker that then drops the last reference of
    a tensor owned by a Python object must take the GIL of a finalising interpreter, which ends
    the thread mid-destructor: "terminate called without an active exception", SIGABRT, after
    the work is done. Called at exit (``atexit``, registered by :func:`dgpo.cli.main`), when the
    models are no longer referenced: the collection here frees them and the process group, whose
    destructor joins the threads. Lightning destroys only NCCL groups at exit. A no-op without a
    process group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    gc.collect()
