"""The module's side of :class:`~dgpo.rollout.policy.RolloutPolicy`: log-probs and weights.

Mixed into :class:`~dgpo.module.RLVRModule`: what the rollout callback and the evaluator read
(the sampling temperature, whether a reference model is loaded, the module an engine may sample
from, the full weights for the engine) and the behaviour / reference log-probs of rollout samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from dgpo.batching import has_dropout, micro_batches
from dgpo.distributed import call_in_forward, full_weights
from dgpo.logprobs import sequence_logprobs
from dgpo.lora import adapters_disabled, engine_weights
from dgpo.models import resolve_model
from dgpo.rollout.buffer import RolloutSample, collate_samples
from dgpo.strategies import strategy_kind


class PolicyScoring:
    """Log-probs of rollout samples and the policy's weights for an engine (see the module)."""

    hparams: Any
    lora: Any
    policy: torch.nn.Module | None
    reference: torch.nn.Module | None
    trainer: Any
    _trainer: Any
    model_name_or_path: str
    _model_path: str | None
    _tokenizer: Any
    device: torch.device

    @property
    def model_path(self) -> str:
        """Local folder (or hub id) of the initial policy; built-in models are materialised here."""
        if self._model_path is None or self._model_path.startswith("builtin:"):
            self._model_path = resolve_model(self.model_name_or_path)
        return self._model_path

    @property
    def tokenizer(self) -> Any:
        """The policy's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            if self._tokenizer.pad_token_id is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    @property
    def sampling_temperature(self) -> float:
        """The rollouts' sampling temperature (``temperature``), which training log-probs use."""
        return float(self.hparams.temperature)

    @property
    def has_reference(self) -> bool:
        """Whether ``score_samples(reference=True)`` works: a KL penalty is on (``kl_coef > 0``).

        The reference is the frozen initial model, or with LoRA the policy with its adapters off.
        """
        return self.reference is not None or (self.lora is not None
                                              and self.hparams.kl_coef > 0)

    def policy_for_engine(self) -> torch.nn.Module | None:
        """The policy module an engine may sample from in place, or None when it is sharded.

        A sharded policy cannot be sampled from directly: the engine then keeps its own copy,
        loaded from :attr:`model_path` and updated by :meth:`named_weights_for_engine`.
        """
        return None if self.sharded else self.policy

    @property
    def sharded(self) -> bool:
        """Whether the policy's parameters are sharded over ranks (FSDP1 or FSDP2)."""
        return self._trainer is not None and strategy_kind(self.trainer.strategy) != "replicated"

    @property
    def shares_prompts(self) -> bool:
        """Whether training log-probs run each distinct prompt once (``share_prompts``).

        Not with Hugging Face's gradient checkpointing, which drops the KV cache while training;
        the strategies' activation checkpointing is fine. Scoring (no backward pass) shares
        prompts whenever ``share_prompts`` is on.
        """
        return (self.hparams.share_prompts and self.policy is not None
                and not getattr(self.policy, "is_gradient_checkpointing", False))

    @property
    def can_defer_old_logp(self) -> bool:
        """Whether the first mini-batch's training log-probs can serve as its behaviour log-probs.

        True without dropout (train- and eval-mode forward passes agree). The rollout callback
        then scores only the other mini-batches' samples (under FSDP each rank its own, however
        many: :meth:`score_samples` evens out the forward passes).
        """
        return self.policy is not None and not has_dropout(self.policy)

    def named_weights_for_engine(self) -> Iterator[tuple[str, Tensor]]:
        """The policy's full weights by Hugging Face name, one tensor at a time, for the engine.

        Under FSDP they are gathered one shard unit (FSDP1) or parameter (FSDP2) at a time, and
        every rank must consume the iterator (see :func:`dgpo.distributed.full_weights`).
        """
        assert self.policy is not None, "configure_model() has not run"
        named = full_weights(self.policy) if self.sharded else (
            (name, tensor.detach()) for name, tensor in self.policy.state_dict().items())
        # LoRA: W + scale·B@A under the base model's names, the policy left as it is
        yield from engine_weights(self.policy, named) if self.lora is not None else named

    # -------------------------------------------------------------------------------- log-probs
    def _logprobs(self, model: torch.nn.Module, batch: dict[str, Tensor], with_entropy: bool,
                  share_prompts: bool, temperature: float | None = None) -> tuple[Tensor, Tensor]:
        temperature = self.sampling_temperature if temperature is None else temperature
        # FSDP: inside the model unit's forward, which gathers the parameters it holds
        return call_in_forward(model, lambda inner: sequence_logprobs(
            inner, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
            temperature=temperature, chunk_size=self.hparams.logprob_chunk_size,
            with_entropy=with_entropy, keep_gib=self.hparams.logprob_keep_gib,
            share_prompts=share_prompts, same_calls=self.sharded))

    @torch.no_grad()
    def score_samples(self, samples: list[RolloutSample], reference: bool = False,
                      temperature: float | None = None) -> list[Tensor]:
        """Log-probs of each sample's response tokens under the policy (or the reference model).

        ``temperature`` defaults to the sampling temperature (:attr:`sampling_temperature`).
        Runs in eval mode in micro-batches sorted by length (groups together when prompts are
        shared); returns one float32 CPU tensor per sample, in the input order. Under FSDP every
        rank must call it (a collective), with any number of samples: a rank with fewer
        micro-batches than another repeats one (or a one-token filler) so that all ranks make the
        same forward passes.
        """
        if reference and self.lora is not None:  # the same model, adapters off
            with adapters_disabled(self.policy):
                return self.score_samples(samples, temperature=temperature)
        model = self.reference if reference else self.policy
        assert model is not None, "the model is not loaded (configure_model) or kl_coef is 0"
        out: list[Tensor] = [torch.empty(0)] * len(samples)
        if not samples and not self.sharded:  # e.g. every π_old is deferred to the training pass
            return out
        pad = self.tokenizer.pad_token_id or 0
        share = self.hparams.share_prompts  # no backward pass: nothing is recomputed
        batches = list(micro_batches(collate_samples(samples, pad), self.hparams.micro_batch_size,
                                     by_group=share)) if samples else []
        if self.sharded:
            count = self.trainer.strategy.reduce(torch.tensor(len(batches), device=self.device),
                                                 reduce_op="max")
            filler = batches[-1][1] if batches else collate_samples(
                [RolloutSample(prompt_ids=[pad], response_ids=[pad], advantage=0.0)], pad)
            batches += [(None, filler)] * (int(count) - len(batches))
        was_training = model.training
        model.eval()
        for rows, micro in batches:
            micro = {key: value.to(self.device) for key, value in micro.items()}
            logp, _ = self._logprobs(model, micro, with_entropy=False, share_prompts=share,
                                     temperature=temperature)
            for row, index in enumerate(rows.tolist() if rows is not None else []):
                out[index] = logp[row][micro["response_mask"][row]].float().cpu()
        model.train(was_training)
        return out
