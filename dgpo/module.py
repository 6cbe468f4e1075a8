"""The LightningModule: the policy, the frozen reference model, the policy loss and optimisation."""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed.fsdp.wrap import wrap

from dgpo.batching import micro_batches, resolve_old_logp
from dgpo.checkpoint import (
    allow_missing_reference_weights,
    drop_reference_weights,
    restore_rng_states,
    rng_states,
)
from dgpo.distributed import TokenMeans
from dgpo.evaluation.config import EvalConfig
from dgpo.evaluation.evaluator import Evaluator
from dgpo.evaluation.hooks import EvaluationHooks
from dgpo.loading import DTYPES, load_causal_lm, wrap_from_rank0
from dgpo.lora import (
    LoraSettings,
    allow_missing_base_weights,
    apply_lora,
    drop_frozen_base_weights,
)
from dgpo.losses import (
    KL_ESTIMATORS,
    PolicyLoss,
    check_correction,
    kl_penalty,
    loss_config,
    resolve_loss,
    rollout_correction,
    rollout_correction_metrics,
)
from dgpo.losses.correction import CorrectionMode
from dgpo.losses.kl import KLEstimator
from dgpo.models import resolve_model
from dgpo.optim import adamw_with_schedule, check_schedule, clip_grad_norm, non_finite_step
from dgpo.policy_scoring import PolicyScoring
from dgpo.rollout.engine import RolloutEngine
from dgpo.strategies import check_module_sharding, strategy_kind


class RLVRModule(PolicyScoring, EvaluationHooks, LightningModule):
    """A causal language model trained with a policy loss on rollouts served by the data module.

    One training batch is one mini-batch of the rollout buffer and one optimiser step (manual
    optimisation): it is split into micro-batches of ``micro_batch_size`` sequences, sorted by
    length to limit padding, whose gradients accumulate before the step. The loss is normalised
    by the global token count of the mini-batch, so the split does not change the gradient.

    The rollout callback reads it through :class:`~dgpo.rollout.policy.RolloutPolicy` (a typed,
    read-only interface: tokenizer, model path, the module an engine may sample from, its weights
    for the engine, behaviour / reference log-probs) and never sets attributes on it. Under FSDP
    (``FSDPStrategy``, :mod:`dgpo.strategies`) and DDP each rank trains on its part of every
    mini-batch; :meth:`score_samples` and :meth:`named_weights_for_engine` are then collectives.

    A step whose loss or gradient norm is not finite is skipped (no update, counted in
    ``train/skipped_steps``); more than ``max_skipped_steps`` in a row stop the run with an error
    naming the metric, step and epoch, before any checkpoint of the bad state is written.

    Validation and test sample answers to the data module's benchmarks
    (:class:`~dgpo.evaluation.hooks.EvaluationHooks`).

    Args:
        model_name_or_path: a local Hugging Face folder, a hub id, or a built-in name
            (``builtin:smollm2-135m-instruct``, ``builtin:tiny-qwen2``).
        loss: the policy loss: a :class:`~dgpo.losses.PolicyLoss` (``class_path`` in YAML) or a
            built-in name (``"dgpo"``, ``"grpo"``, ...). Defaults to ``DGPOLoss()``. Saved with
            the checkpoint (class and hyper-parameters) and rebuilt by ``load_from_checkpoint``.
        engine: the rollout engine that validation and test sample with (the CLI hands the
            top-level ``engine:`` to this and to the rollout callback); ``None``: a
            :class:`~dgpo.rollout.TransformersEngine` on the policy.
        temperature: the sampling temperature of the rollouts, which the training log-probs
            use too (the CLI links it from ``rollout.temperature``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps of the learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` decay to ``min_lr_ratio · lr`` after warm-up.
        min_lr_ratio: floor of the cosine schedule, as a fraction of ``lr``.
        max_grad_norm: gradient clipping by global norm; ``None`` disables it.
        kl_coef: coefficient of the KL penalty to the frozen reference model; the reference
            model is only loaded when it is > 0.
        kl_estimator: the per-token KL estimator (:func:`~dgpo.losses.kl_penalty`): ``"k1"``,
            ``"k2"``, ``"k3"`` (the default, as in GRPO) or ``"low_var_kl"`` (k3 clamped).
        entropy_coef: coefficient of an entropy bonus (0 in the paper).
        micro_batch_size: sequences per forward/backward pass.
        dtype: dtype of the policy's weights.
        logprob_chunk_size: tokens projected through the LM head at once (see :mod:`dgpo.logprobs`).
        logprob_keep_gib: log-softmax chunks (float32) of up to this many GiB per micro-batch are
            kept for the backward pass; the rest are recomputed there (``0``: least memory).
        share_prompts: run each distinct prompt of a micro-batch through the model once, its KV
            cache shared by the group's samples (same numbers; training passes skip it with
            ``gradient_checkpointing``). Micro-batches then keep groups together.
        gradient_checkpointing: Hugging Face's activation checkpointing (drops the KV cache,
            hence prompt sharing, while training); under FSDP prefer the strategy's
            ``activation_checkpointing_policy``, which keeps it.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``"sdpa"`` or
            ``"flash_attention_2"``).
        evaluation: sampling and scoring of validation and test (``k``, ``temperature``, ...);
            see :class:`~dgpo.evaluation.EvalConfig` for the defaults (the paper's).
        max_skipped_steps: how many optimiser steps in a row may be skipped for a non-finite
            loss or gradient norm before the run stops with an error.
        rollout_correction: train–inference mismatch correction: every token's loss is
            multiplied by :func:`~dgpo.losses.rollout_correction` weights of π_old / π_rollout
            (the engine's sampling log-probs): ``"token_truncate"``, ``"token_mask"``,
            ``"sequence_truncate"``, ``"sequence_mask"``, or ``None`` (off). Metrics under
            ``rollout/mismatch/``.
        correction_cap: the upper bound of the correction weights (TRL's default: 3.0).
        lora: LoRA adapters (:class:`~dgpo.lora.LoraSettings`: ``r``, ``alpha``, ``dropout``,
            ``target_modules``); only they are trained and saved, the KL reference is the same
            model with the adapters off, and engines receive the merged weights. ``None``: full
            fine-tuning.
        correction_low: their lower bound (``None``: as :func:`~dgpo.losses.rollout_correction`
            defines).

    Raises:
        ValueError: for an unknown loss name or an out-of-range setting.
        FileNotFoundError: for a local model path that does not exist.
    """

    def __init__(self, model_name_or_path: str, loss: PolicyLoss | str | None = None,
                 lr: float = 1e-6, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 lr_schedule: Literal["constant", "cosine"] = "constant",
                 min_lr_ratio: float = 0.0, max_grad_norm: float | None = 1.0,
                 kl_coef: float = 0.0, entropy_coef: float = 0.0, micro_batch_size: int = 8,
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 logprob_chunk_size: int = 512, logprob_keep_gib: float = 1.0,
                 share_prompts: bool = True, gradient_checkpointing: bool = False,
                 attn_implementation: str | None = None,
                 evaluation: EvalConfig | None = None, engine: RolloutEngine | None = None,
                 temperature: float = 1.0, max_skipped_steps: int = 3,
                 kl_estimator: KLEstimator = "k3",
                 rollout_correction: CorrectionMode | None = None, correction_cap: float = 3.0,
                 correction_low: float | None = None, lora: LoraSettings | None = None) -> None:
        super().__init__()
        evaluation = EvalConfig.build(evaluation)  # a dict when loaded from a checkpoint
        loss = resolve_loss(loss)  # a dict (class_path, init_args) when loaded from a checkpoint
        check_schedule(lr, weight_decay, warmup_steps, lr_schedule, min_lr_ratio)
        _check_positive("micro_batch_size", micro_batch_size)
        _check_positive("logprob_chunk_size", logprob_chunk_size)
        for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef),
                            ("logprob_keep_gib", logprob_keep_gib)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if max_grad_norm is not None:
            _check_positive("max_grad_norm", max_grad_norm)
        _check_positive("temperature", temperature)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got "
                             f"{kl_estimator!r}")
        if rollout_correction is not None:
            check_correction(rollout_correction, correction_cap, correction_low)
            if "weights" not in inspect.signature(loss.__call__).parameters:
                raise ValueError(f"rollout_correction={rollout_correction!r} needs a loss whose "
                                 f"call takes weights=; {type(loss).__name__} overrides __call__ "
                                 "without it")
        if isinstance(max_skipped_steps, bool) or not max_skipped_steps >= 0:
            raise ValueError(
                f"max_skipped_steps must be an integer >= 0, got {max_skipped_steps!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        lora = LoraSettings.build(lora)  # a dict when loaded from a checkpoint
        self.save_hyperparameters(ignore=["loss", "evaluation", "engine", "lora"])
        self.hparams["lora"] = None if lora is None else asdict(lora)
        self.lora = lora
        self.hparams["evaluation"] = asdict(evaluation)  # plain values: weights_only loading
        self.hparams["loss"] = loss_config(loss)  # class_path + init_args: load_from_checkpoint
        self.evaluator = Evaluator(evaluation, engine)
        self.loss_fn = loss
        self.model_name_or_path = model_name_or_path
        self._model_path = resolve_model(model_name_or_path, check_only=True)
        self.automatic_optimization = False
        self._skips_in_row = 0
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._token_means = TokenMeans()  # token-weighted train metrics, reduced at epoch end
        # The frozen reference model is not state: checkpoints reload it from its path, and
        # every strict load that goes through load_state_dict accepts its absence (FSDP2Strategy
        # hides it from Lightning's parameter-by-parameter load of full checkpoints).
        self.register_state_dict_post_hook(drop_reference_weights)
        self.register_load_state_dict_post_hook(allow_missing_reference_weights)
        if lora is not None:  # checkpoints hold the adapters; the frozen base reloads
            self.register_state_dict_post_hook(drop_frozen_base_weights)
            self.register_load_state_dict_post_hook(allow_missing_base_weights)

    # ----------------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Load the policy (and the reference model when ``kl_coef > 0``) once.

        Under FSDP on several ranks only rank 0 reads the weights; the other ranks build the
        model on the meta device and receive rank 0's weights once it is sharded
        (:func:`dgpo.distributed.load_from_rank0`), so a node holds one full copy in CPU memory.
        """
        if self.policy is not None:
            return
        check_module_sharding(self._trainer.strategy if self._trainer is not None else None)
        policy = self._load_model().train()  # from_pretrained returns eval mode
        if self.lora is not None:
            policy = apply_lora(policy, self.lora)
        if self.hparams.gradient_checkpointing:
            policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
        self.policy = self._shard(policy)
        if self.hparams.kl_coef > 0 and self.lora is None:  # LoRA: the adapters switched off
            self.reference = self._shard(self._load_model().eval().requires_grad_(False))

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under FSDPStrategy, ``model`` as its own FSDP root unit; elsewhere ``model`` as is.

        ``wrap`` applies the strategy's settings (auto-wrap policy, mixed precision, ...).
        FSDP2Strategy shards the models (and fills them from rank 0) after configure_model.
        """
        if self._loads_on_rank0 and strategy_kind(self.trainer.strategy) == "fsdp1":
            return wrap_from_rank0(model, self.trainer.strategy.root_device,
                                   is_rank0=self.global_rank == 0)
        return wrap(model)

    @property
    def _loads_on_rank0(self) -> bool:
        """Whether only rank 0 reads the weights (a sharded policy on several ranks)."""
        return self.sharded and self.trainer.world_size > 1

    def _load_model(self) -> torch.nn.Module:
        return load_causal_lm(self.model_path, DTYPES[self.hparams.dtype],
                              self.hparams.attn_implementation,
                              empty=self._loads_on_rank0 and self.global_rank != 0)

    # -------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """One optimiser step on one mini-batch; returns the loss and per-token diagnostics.

        The optimised total is the policy loss, plus ``kl_coef`` times the KL penalty, minus
        ``entropy_coef`` times the entropy (each a global token mean): ``train/loss`` logs that
        total, ``train/policy_loss``, ``train/kl_loss`` and ``train/entropy_loss`` its terms.

        The returned dict (available to callbacks in ``on_train_batch_end`` as ``outputs``) holds
        ``loss`` and detached ``(B, L−1)`` tensors ``ratio``, ``advantages``, ``mask``,
        ``old_logp``, ``logp`` and ``prob_weight`` (``None`` for a loss that does not state it).
        """
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        mask = batch["response_mask"]
        local_tokens = mask.sum().float()
        num_tokens = self.trainer.strategy.reduce(local_tokens.clone(), reduce_op="sum")
        # DDP/FSDP average gradients over ranks; the loss is already normalised globally.
        scale = float(self.trainer.world_size)
        diagnostics = {key: torch.zeros_like(mask, dtype=torch.float32)
                       for key in ("ratio", "logp", "prob_weight", "entropy", "old_logp")}
        deferred = batch.get("defer_old_logp")
        if deferred is not None and deferred.any() and batch_idx != 0:
            raise RuntimeError(f"mini-batch {batch_idx} defers its behaviour log-probs to the "
                               "training pass, which is exact only before the first update")
        terms = {name: torch.zeros((), device=self.device)
                 for name in ("policy_loss", "kl_loss", "entropy_loss")}
        share = self.shares_prompts
        for rows, micro in micro_batches(batch, self.hparams.micro_batch_size, by_group=share):
            logp, entropy = self._logprobs(self.policy, micro, with_entropy=True,
                                           share_prompts=share)
            micro_mask = micro["response_mask"]
            old_logp = resolve_old_logp(micro["old_logp"], logp, micro.get("defer_old_logp"))
            weights = self._correction(old_logp, micro["rollout_logp"], micro_mask)
            out = self.loss_fn(logp, old_logp, micro["advantages"], micro_mask,
                               num_tokens=num_tokens, num_sequences=mask.shape[0], **weights)
            loss = out.loss
            token_count = micro_mask.sum().clamp(min=1)
            terms["policy_loss"] += out.loss.detach()
            if self.hparams.entropy_coef > 0:
                mean_entropy = (entropy * micro_mask).sum() / num_tokens
                entropy_loss = -self.hparams.entropy_coef * mean_entropy
                loss = loss + entropy_loss
                terms["entropy_loss"] += entropy_loss.detach()
            if self.hparams.kl_coef > 0:
                kl = kl_penalty(logp, micro["ref_logp"], self.hparams.kl_estimator) * micro_mask
                kl_loss = self.hparams.kl_coef * kl.sum() / num_tokens
                loss = loss + kl_loss
                terms["kl_loss"] += kl_loss.detach()
                self._token_means.update("train/kl", kl.sum() / token_count, int(token_count))
            self.manual_backward(loss * scale)
            self._log_micro(out.metrics, entropy, micro_mask, int(token_count))
            width = logp.shape[1]
            for key, value in (("ratio", out.ratio), ("logp", logp), ("entropy", entropy),
                               ("prob_weight", out.prob_weight), ("old_logp", old_logp)):
                if value is not None:
                    diagnostics[key][rows, :width] = value.detach().float() * micro_mask
        grad_norm = clip_grad_norm(self.policy, self.hparams.max_grad_norm)
        # each rank's terms are its tokens' share of the global token-means: the sums are global
        names = list(terms)
        totals = self.trainer.strategy.reduce(torch.stack([terms[n] for n in names]),
                                              reduce_op="sum")
        terms = dict(zip(names, totals, strict=True))
        total = sum(terms.values())
        skipped = self._skip_if_not_finite({"train/loss": total, "train/grad_norm": grad_norm})
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # sync_dist below: the values are the same on every rank (no-op means, and no warnings)
        self.log("train/loss", total, on_epoch=True, on_step=True, prog_bar=True,
                 batch_size=mask.shape[0], sync_dist=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_epoch=True, on_step=False,
                     batch_size=mask.shape[0], sync_dist=True)
        self.log("train/skipped_steps", float(skipped), on_epoch=True, on_step=False,
                 reduce_fx="sum", sync_dist=True)
        self.log("train/grad_norm", grad_norm, on_epoch=True, on_step=False, sync_dist=True)
        self.log("train/lr", scheduler.get_last_lr()[0], on_epoch=True, on_step=False,
                 sync_dist=True)
        return {
            "loss": total,
            "mask": mask,
            "advantages": batch["advantages"][:, None].expand_as(mask) * mask,
            "old_logp": diagnostics["old_logp"],
            "ratio": diagnostics["ratio"],
            "logp": diagnostics["logp"],
            "entropy": diagnostics["entropy"],
            "prob_weight": diagnostics["prob_weight"] if self.loss_fn.states_prob_weight else None,
        }

    def _correction(self, old_logp: Tensor, rollout_logp: Tensor,
                    mask: Tensor) -> dict[str, Tensor]:
        """``{"weights": ...}`` of the mismatch correction (and its metrics), or ``{}`` (off)."""
        hp = self.hparams
        if hp.rollout_correction is None:
            return {}
        settings = (hp.rollout_correction, hp.correction_cap, hp.correction_low)
        tokens = int(mask.sum())
        for name, value in rollout_correction_metrics(old_logp, rollout_logp, mask,
                                                      *settings).items():
            self._log_metric(f"rollout/mismatch/{name}", value, tokens)
        return {"weights": rollout_correction(old_logp, rollout_logp, mask, *settings)}

    def _skip_if_not_finite(self, values: dict[str, Tensor]) -> bool:
        """Whether to skip this step (see :func:`dgpo.optim.non_finite_step`); warns if so."""
        where = (f"optimiser step {self.global_step} (epoch {self.current_epoch}, "
                 f"mini-batch {self.trainer.fit_loop.epoch_loop.batch_idx})")
        self._skips_in_row = non_finite_step(values, self._skips_in_row,
                                             self.hparams.max_skipped_steps, where)
        return self._skips_in_row > 0

    def _log_micro(self, metrics: dict[str, Tensor], entropy: Tensor, mask: Tensor,
                   tokens: int) -> None:
        for name, value in metrics.items():
            self._log_metric(f"train/{name}", value, tokens)
        self._token_means.update("train/entropy", (entropy * mask).sum() / max(tokens, 1), tokens)

    def _log_metric(self, name: str, value: Tensor, tokens: int) -> None:
        """A per-token metric: a token-weighted mean, or a max/min when its name ends so."""
        reduce = "max" if name.endswith("/max") else "min" if name.endswith("/min") else "mean"
        if reduce == "mean":  # token-weighted over the epoch and all ranks
            self._token_means.update(name, value, tokens)
        else:
            self.log(name, value, on_epoch=True, on_step=False, reduce_fx=reduce,
                     batch_size=tokens, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's token-weighted train metrics, reduced over all ranks."""
        for name, value in self._token_means.compute().items():
            self.log(name, value, sync_dist=True)  # the same value on every rank

    # ------------------------------------------------------------------------------ optimisers
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warm-up and a constant or cosine schedule (:mod:`dgpo.optim`)."""
        hp = self.hparams
        return adamw_with_schedule(
            [p for p in self.parameters() if p.requires_grad], lr=hp.lr, betas=hp.betas,
            weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps, schedule=hp.lr_schedule,
            total_steps=int(self.trainer.estimated_stepping_batches),
            min_lr_ratio=hp.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the RNG states (the state dict already leaves the reference model out)."""
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states."""
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
