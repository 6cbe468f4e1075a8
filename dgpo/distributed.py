"""Helpers for running the RL loop on several ranks.

- which prompts a rank generates for (:func:`shard_bounds`), and gathering every rank's rollout
  (:func:`all_gather_objects`);
- reward metrics combined across ranks by the reduction each one declares, means weighted by
  sample counts, never averages of averages (:func:`reduce_reward_metrics`);
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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import MeanMetric

from dgpo.rewards.base import REDUCTIONS, Reduction, RewardOutput

T = TypeVar("T")

#: Module-name parts that wrappers insert and Hugging Face names do not have.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


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


def reduce_reward_metrics(
    per_rank: Sequence[tuple[Mapping[str, float], Mapping[str, Reduction], int]],
) -> dict[str, float]:
    """Combine each rank's reward metrics into global ones, each by its declared reduction.

    The reductions are the ones a reward declares in its
    :class:`~dgpo.rewards.RewardOutput` (which fills in
    :data:`~dgpo.rewards.base.DEFAULT_REDUCTION`, ``"mean"``, for a metric it leaves out):

    - ``"mean"``: the sample-weighted mean ``Σ value·count / Σ count``, i.e. the value one rank
      would have computed on all the samples (when every count is 0, the plain mean);
    - ``"sum"``: ``Σ value`` (counts: ``samples``, ``timeouts``, ...);
    - ``"max"`` / ``"min"``: the largest / smallest value.

    A metric missing on some rank counts as absent there. On one rank the result is that rank's
    metrics.

    Args:
        per_rank: One ``(metrics, reductions, count)`` per rank: the rank's metric values, how
            each one combines across ranks, and the number of samples they describe (the
            weight of a ``"mean"``).

    Returns:
        The global value of every metric that some rank reports.

    Raises:
        ValueError: If a metric has no reduction, a reduction is not one of
            :data:`~dgpo.rewards.base.REDUCTIONS`, or two ranks declare different reductions for
            one metric.

    Example:
        >>> reduce_reward_metrics([({"accuracy": 0.5, "timeouts": 1.0}, {"accuracy": "mean",
        ...                          "timeouts": "sum"}, 4),
        ...                        ({"accuracy": 0.0, "timeouts": 2.0}, {"accuracy": "mean",
        ...                          "timeouts": "sum"}, 12)])
        {'accuracy': 0.125, 'timeouts': 3.0}
    """
    values: dict[str, list[tuple[float, int]]] = {}
    declared: dict[str, Reduction] = {}
    for metrics, reductions, count in per_rank:
        for name, value in metrics.items():
            if name not in reductions:
                raise ValueError(f"reward metric {name!r} has no declared reduction; declare one "
                                 f"of {list(REDUCTIONS)} in RewardOutput.reductions")
            how = reductions[name]
            if how not in REDUCTIONS:
                raise ValueError(f"reduction {how!r} of reward metric {name!r} is not one of "
                                 f"{list(REDUCTIONS)}")
            if declared.setdefault(name, how) != how:
                raise ValueError(f"reward metric {name!r} is declared {how!r} on one rank and "
                                 f"{declared[name]!r} on another; a metric has one reduction")
            values.setdefault(name, []).append((float(value), count))
    return {name: _reduce(declared[name], pairs) for name, pairs in values.items()}


def concat_reward_outputs(parts: Sequence[RewardOutput]) -> RewardOutput:
    """One reward output for the samples of several (each engine's part of a rollout, in order).

    Scores are concatenated; details and correctness too when every part has them for all its
    samples (else they are dropped); metrics are combined by their declared reductions (see
    :func:`reduce_reward_metrics`, each part weighted by its number of samples).

    Example:
        >>> a = RewardOutput([1.0], metrics={"n": 1.0, "acc": 1.0}, reductions={"n": "sum"})
        >>> b = RewardOutput([0.0, 0.0, 1.0], metrics={"n": 3.0, "acc": 1 / 3},
        ...                  reductions={"n": "sum"})
        >>> concat_reward_outputs([a, b]).metrics
        {'n': 4.0, 'acc': 0.5}
    """
    full_details = all(len(p.details) == len(p.scores) for p in parts)
    full_correct = all(p.correct is not None for p in parts)
    reductions: dict[str, Reduction] = {}
    for part in parts:
        reductions.update(part.reductions)
    return RewardOutput(
        scores=[s for p in parts for s in p.scores],
        details=[d for p in parts for d in p.details] if full_details else [],
        metrics=reduce_reward_metrics([(p.metrics, p.reductions, len(p.scores)) for p in parts]),
        reductions=reductions,
        correct=[c for p in parts for c in p.correct or []] if full_correct else None,
    )


def _reduce(how: Reduction, pairs: list[tuple[float, int]]) -> float:
    """One metric's global value from its ``(value, sample count)`` on each rank."""
    if how == "sum":
        return sum(value for value, _ in pairs)
    if how == "max":
        return max(value for value, _ in pairs)
    if how == "min":
        return min(value for value, _ in pairs)
    weight = sum(count for _, count in pairs)
    if weight == 0:
        return sum(value for value, _ in pairs) / len(pairs)
    return sum(value * count for value, count in pairs) / weight


class TokenMeans:
    """Token-weighted means over an epoch, one torchmetrics ``MeanMetric`` per name.

    torchmetrics keeps each mean as a weighted (sum, weight) state and sums those over the ranks
    when it computes, which is exact: Lightning's ``sync_dist`` of a ``batch_size``-weighted mean
    averages an integer ``cumulated_batch_size`` over ranks and truncates it (gloo), so its epoch
    values can be off (a fraction of 1.004). States are float64, and NaN is kept, never dropped.

    Example:
        >>> means = TokenMeans()
        >>> means.update("train/ratio/mean", torch.tensor(1.0), 3)
        >>> means.update("train/ratio/mean", torch.tensor(2.0), 1)
        >>> means.compute()
        {'train/ratio/mean': tensor(1.2500)}
    """

    def __init__(self) -> None:
        self.means: dict[str, MeanMetric] = {}

    def update(self, name: str, value: Tensor, count: int) -> None:
        """Add ``count`` tokens whose mean is ``value``."""
        metric = self.means.get(name)
        if metric is None:
            # nan_strategy=NaN keeps a NaN as NaN ("disable" would also drop the weights in
            # torchmetrics 1.9, "warn"/"ignore" would drop the NaN)
            metric = MeanMetric(nan_strategy=math.nan).set_dtype(torch.float64)
            metric = self.means[name] = metric.to(value.device)
        metric.update(value.detach().double(), weight=float(count))

    def compute(self) -> dict[str, Tensor]:
        """The means over all ranks (a collective under torch.distributed), then start over."""
        means = {name: self.means[name].compute().float() for name in sorted(self.means)}
        self.means = {}
        return means


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
