"""Rollouts with Hugging Face ``generate``, on the policy module itself or on a copy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor

from dgpo.lora import find_peft_model
from dgpo.models import resolve_model
from dgpo.rollout.engine import Completion, RolloutEngine, SamplingConfig, check_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES = ("auto", "float32", "bfloat16", "float16")


class TransformersEngine(RolloutEngine):
    """A rollout engine that samples with ``model.generate`` (no vLLM needed).

    Give it the policy module (or let the rollout callback :meth:`attach` it) to sample from the
    policy itself: ``load_weights`` then skips tensors that already are the module's own. Give it
    a ``model_path`` instead to sample from a private copy, loaded on first use, into which
    ``load_weights`` copies new values.

    Every sample has its own ``torch.Generator`` seeded with ``sampling.sample_seed(i, k)``, so
    seeded generation is reproducible and does not touch the global RNG (unseeded sampling draws
    the per-sample seeds from it). Sampling is done by a logits processor that records the raw
    ``log_softmax`` of the logits (no temperature, no top-p) of each sampled token. Prompts are
    left-padded into batches of at most ``max_batch_size`` rows. ``generate`` runs in eval mode
    under ``torch.no_grad()`` with the KV cache on, and restores each submodule's train/eval mode
    afterwards.

    Args:
        model: a causal LM with ``generate`` (e.g. the policy), or None (see ``model_path``).
        tokenizer: its tokenizer; if None, loaded from ``model_path`` or the model's
            ``name_or_path``.
        model_path: folder, hub id or ``builtin:`` name of a private copy to load when ``model`` is
            None; if both are None the policy is taken from :meth:`attach`.
        dtype: dtype of a loaded copy; ``"auto"`` means float32 on CPU and bfloat16 on GPU.
        device: device of a loaded copy (default: CUDA if available, else CPU).
        max_batch_size: most sequences generated or scored at once (>= 1).

    Raises:
        ValueError: if an argument is invalid.

    Example:
        >>> engine = TransformersEngine(model_path="builtin:tiny-qwen2")  # doctest: +SKIP
        >>> completions = engine.generate([[1, 2, 3]], SamplingConfig(n=2, max_new_tokens=8))

    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        model_path: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_size: int = 64,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}.")
        if model is not None and not hasattr(model, "generate"):
            raise ValueError(f"model must have a `generate` method, got {type(model).__name__}.")
        self.model_path = model_path
        self.dtype = dtype
        self.device_name = device
        self.max_batch_size = max_batch_size
        self._module = model
        self._tokenizer = tokenizer

    def attach(self, module: torch.nn.Module | None, model_path: str) -> None:
        """Sample from ``module`` itself unless the engine already has a model of its own.

        With ``module=None`` (a policy sharded by FSDP) the engine loads a private copy from
        ``model_path`` on first use.
        """
        if self._module is None and self.model_path is None:
            self._module = module
        if self.model_path is None:
            self.model_path = model_path

    @property
    def module(self) -> torch.nn.Module:
        """The module sampled from (a private copy is loaded on first access)."""
        if self._module is None:
            if self.model_path is None:
                raise RuntimeError(
                    "TransformersEngine has no model: pass `model` or `model_path`, "
                    "or call attach()."
                )
            self._module = self._load(self.model_path)
        return self._module

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer used to decode completions (loaded on first access)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.model_path or getattr(self.module, "name_or_path", None)
            if not source:
                raise ValueError(
                    "Pass `tokenizer`: the model has no `name_or_path` to load it from."
                )
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(source))
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        """Stop tokens: the tokenizer's eos plus those of the model's generation config."""
        return _eos_token_ids(self.module, self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """Padding token (the first eos token if the tokenizer has no pad token)."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_token_ids[0]

    @property
    def device(self) -> torch.device:
        """Device of the module's first parameter."""
        return next(self.module.parameters()).device

    def _load(self, model_path: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        device = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if torch.device(device).type == "cpu" else "bfloat16"
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(model_path), dtype=getattr(torch, dtype)
        )
        return model.to(device).eval()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt; see :meth:`RolloutEngine.generate`."""
        check_prompts(prompt_ids)
        rows = [(i, k) for i in range(len(prompt_ids)) for k in range(sampling.n)]
        if sampling.seed is None:  # draw per-sample seeds from the global RNG
            seeds = [int(s) for s in torch.randint(0, 2**62, (len(rows),)).tolist()]
        else:
            seeds = [sampling.sample_seed(i, k) for i, k in rows]
        completions: list[Completion] = []
        with _eval_mode(self.module), torch.no_grad():
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                prompts = [prompt_ids[i] for i, _ in chunk]
                chunk_seeds = seeds[start : start + len(chunk)]
                tokens, logprobs = self._generate_batch(prompts, chunk_seeds, sampling)
                for (i, _), row_tokens, row_logprobs in zip(chunk, tokens, logprobs, strict=True):
                    completions.append(
                        self._completion(i, row_tokens, row_logprobs, sampling.ignore_eos)
                    )
        return completions

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs from a forward pass; see :meth:`RolloutEngine.score`."""
        check_prompts(sequences, "sequences")
        result: list[list[float]] = []
        with _eval_mode(self.module), torch.no_grad():
            for start in range(0, len(sequences), self.max_batch_size):
                batch = sequences[start : start + self.max_batch_size]
                width = max(len(seq) for seq in batch)
                ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, seq in enumerate(batch):  # right padding keeps positions exact
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                logits = self.module(input_ids=ids, attention_mask=mask).logits[:, :-1]
                logp = torch.log_softmax(logits.float(), dim=-1)
                token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
                result += [
                    token_logp[row, : len(seq) - 1].tolist() for row, seq in enumerate(batch)
                ]
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new values into the module; tensors that already are its own are skipped.

        Raises:
            ValueError: naming the parameters the module does not have.

        """
        if find_peft_model(self.module) is not None:  # it samples from the LoRA policy itself
            for _ in named_tensors:  # consumed: under FSDP gathering them is a collective
                pass
            return
        state = self.module.state_dict(keep_vars=True)
        unknown = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = state.get(name)
                if target is None:
                    unknown.append(name)
                elif target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)
        if unknown:
            raise ValueError(
                f"Unknown parameter names {unknown[:5]} ({len(unknown)} in all); the module has "
                f"names such as {list(state)[:3]}."
            )

    def _generate_batch(
        self, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig
    ) -> tuple[list[list[int]], list[list[float]]]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: new tokens line up on the right
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        sampler = _SeededSampler(sampling.temperature, sampling.top_p, seeds)
        # Greedy decoding over the sampler's one-hot scores; a fresh config (temporarily also the
        # module's) keeps the checkpoint's generation defaults (repetition penalty, ...) out.
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            use_cache=True,  # the trainer may have turned it off in the model config
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=None if sampling.ignore_eos else self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        saved_config = getattr(self.module, "generation_config", None)
        self.module.generation_config = config
        try:
            output = self.module.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
            )
        finally:
            self.module.generation_config = saved_config
        new_tokens = output[:, width:].cpu().tolist()
        step_logprobs = (
            torch.stack(sampler.logprobs, dim=1).cpu().tolist() if sampler.logprobs else []
        )
        return new_tokens, step_logprobs or [[] for _ in prompts]

    def _completion(
        self, prompt_index: int, tokens: list[int], logprobs: list[float], ignore_eos: bool = False
    ) -> Completion:
        eos = [] if ignore_eos else self.eos_token_ids
        stop_at = next((t for t, tok in enumerate(tokens) if tok in eos), None)
        if stop_at is not None:
            tokens, logprobs = tokens[: stop_at + 1], logprobs[: stop_at + 1]
        finish = "stop" if stop_at is not None else "length"
        return Completion(
            prompt_index=prompt_index,
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish,
            logprobs=logprobs[: len(tokens)],
        )


class _SeededSampler(LogitsProcessor):
    """A logits processor that samples each row with its own generator.

    It records the raw log-prob of each chosen token and returns scores that are ``-inf`` except
    at the chosen token, so greedy decoding picks it.
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int]) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.seeds = seeds
        self.generators: list[torch.Generator] = []
        self.logprobs: list[torch.Tensor] = []  # one (B,) tensor per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.temperature == 0:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = self._sample(scores)
        log_norm = torch.logsumexp(scores, dim=-1)
        self.logprobs.append(scores.gather(-1, tokens[:, None]).squeeze(-1) - log_norm)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(-1, tokens[:, None], 0.0)

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        """One token per row by the Gumbel-max trick, each row's noise from its own generator.

        ``argmax(logits / T + Gumbel noise)`` is an exact sample of ``softmax(logits / T)``
        (restricted to the top-p nucleus), and costs one batched argmax instead of a
        ``multinomial`` call per row.
        """
        if not self.generators:
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds
            ]
        logits = scores / self.temperature
        if self.top_p < 1.0:
            nucleus = _top_p_filter(torch.softmax(logits, dim=-1), self.top_p) > 0
            logits = logits.masked_fill(~nucleus, float("-inf"))
        vocab = scores.shape[-1]
        noise = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = noise.clamp_(min=torch.finfo(noise.dtype).tiny).log_().neg_().log_().neg_()
        return gumbel.add_(logits).argmax(dim=-1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches ``top_p``."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # never drops the top token
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _eos_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Stop tokens: the tokenizer's eos plus those of the model's generation config."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError(
            "Neither the tokenizer nor the model's generation config has an eos token."
        )
    return ids


class _eval_mode:  # noqa: N801 - used like a function: `with _eval_mode(module):`
    """Put a module in eval mode and restore every submodule's own mode on exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.modes: dict[torch.nn.Module, bool] = {}

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.module.modules()}
        self.module.eval()

    def __exit__(self, *exc_info: object) -> None:
        for module, training in self.modes.items():
            module.training = training
