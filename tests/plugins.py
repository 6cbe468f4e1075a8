"""User-side plug-ins the end-to-end tests load by ``class_path``, as a user's own module would."""

import json
import os
import signal
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback
from torch import Tensor

from dgpo.losses import PolicyLoss
from dgpo.module import RLVRModule
from dgpo.rollout import TransformersEngine


class DigitFractionReward:
    """A dense toy reward: the fraction of digit characters in a completion.

    A tiny random model never solves arithmetic, so the tests use this to get non-zero advantages
    (and therefore parameter updates) while exercising the real reward plug-in path.
    """

    def __call__(self, completions: list[str], answers: list[str], **columns) -> list[float]:
        return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


class SignedLogProbLoss(PolicyLoss):
    """A user's loss: REINFORCE on log π with an optional scale; states no analytic weight."""

    def __init__(self, scale: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.2) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high)
        self.scale = scale

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        return -self.scale * advantages * logp


class NotALoss:
    """Anything that is not a PolicyLoss (for the error path)."""

    def __call__(self, *args, **kwargs) -> Tensor:
        return torch.zeros(())


class StopAfterEpochs(Callback):
    """Interrupts training after ``epochs`` epochs, as a crash or a wall-clock limit would."""

    def __init__(self, epochs: int = 2) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class GradientDump(Callback):
    """Saves what optimiser steps of epoch 0 saw, on rank 0, for the end-to-end tests.

    For each of ``steps`` (optimiser steps of epoch 0, from 0): the full (unsharded) policy
    weights before the step, the full gradient of every parameter just before the optimiser
    step, the step's global loss (the policy loss plus the KL and entropy terms, summed over
    ranks), the rollout buffer (the whole rollout, the same on every rank) and the buffer indices
    of the global mini-batch, so a test can recompute the step on one process from the same
    batch. Saved as ``{step: record}``.
    """

    def __init__(self, path: str, steps: list[int] | None = None) -> None:
        self.path = path
        self.steps = steps or [0]
        self.records: dict[int, dict] = {}
        self.current: dict | None = None  # the record of a step in progress

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx in self.steps:
            weights = {name: tensor.clone()  # collective under FSDP: every rank
                       for name, tensor in pl_module.named_weights_for_engine()}
            self.records[batch_idx] = {"weights": weights, "world_size": trainer.world_size,
                                       "shares_prompts": pl_module.shares_prompts}
            self.current = self.records[batch_idx]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.current is not None:
            self.current["grads"] = _full_gradients(pl_module.policy)  # collective
            self.current = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != 0 or batch_idx not in self.records:
            return
        loss = outputs["loss"]  # the global total: the module sums its ranks' shares
        from dgpo.rollout.buffer import MiniBatchSampler

        buffer = trainer.datamodule.buffer
        record = self.records[batch_idx]
        record.update(loss=float(loss), samples=buffer.samples,
                      indices=list(MiniBatchSampler(buffer).global_batches())[batch_idx])
        if trainer.is_global_zero and batch_idx == max(self.steps):
            torch.save(self.records, self.path)


def recompute_step(record: dict, model_path: str, loss: PolicyLoss,
                   kl_coef: float) -> tuple[float, float, dict[str, Tensor]]:
    """One process's policy loss, mean k3 KL and gradients for a :class:`GradientDump` record.

    An independent route to the step: a fresh Hugging Face model with the record's weights, the
    plain log-prob computation, the loss plus ``kl_coef`` times the token-mean k3 estimate of
    KL(π‖π_ref) written out here, over the global mini-batch on one process.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dgpo.batching import resolve_old_logp
    from dgpo.logprobs import sequence_logprobs
    from dgpo.rollout.buffer import collate_samples

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    model.load_state_dict(record["weights"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate_samples([record["samples"][i] for i in record["indices"]], pad)
    mask = batch["response_mask"]
    logp, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], mask,
                                with_entropy=False)
    old_logp = resolve_old_logp(batch["old_logp"], logp, batch["defer_old_logp"])
    out = loss(logp, old_logp, batch["advantages"], mask, num_tokens=mask.sum(),
               num_sequences=mask.shape[0])
    delta = batch["ref_logp"] - logp
    kl = ((delta.exp() - delta - 1) * mask).sum() / mask.sum()
    (out.loss + kl_coef * kl).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return float(out.loss), float(kl), grads


def _full_gradients(model: torch.nn.Module) -> dict[str, Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    from dgpo.distributed import clean_name

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {clean_name(name): p.grad.detach().clone()
                    for name, p in model.named_parameters() if p.grad is not None}
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[clean_name(name)] = grad.detach().clone()
    return grads


class ScoringCountModule(RLVRModule):
    """Records how many samples each behaviour-log-prob scoring call gets; ``defer = False``
    refuses deferring the first mini-batch's behaviour log-probs to its training pass."""

    defer = True

    @property
    def can_defer_old_logp(self) -> bool:
        return self.defer and super().can_defer_old_logp

    def score_samples(self, samples, reference=False, temperature=None):
        if temperature is None and not reference:  # not the sync check
            self.__dict__.setdefault("scored", []).append(len(samples))
        return super().score_samples(samples, reference=reference, temperature=temperature)


class StaleEngine(TransformersEngine):
    """A private-copy engine that ignores weight pushes: the sync check must catch it."""

    def load_weights(self, named_tensors) -> None:
        for _ in named_tensors:  # consume the iterator (a collective under FSDP), keep nothing
            pass


class PrecisionProbe(Callback):
    """Writes, per rank, the dtypes the policy computes and keeps its buffers in (scale-out)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        from dgpo.distributed import clean_name

        buffers = {clean_name(name): str(buffer.dtype)
                   for name, buffer in pl_module.policy.named_buffers()}
        config = trainer.strategy.mixed_precision_config
        record = {"buffers": buffers, "param_dtype": str(config.param_dtype),
                  "reduce_dtype": str(config.reduce_dtype)}
        with open(f"{self.path}.rank{trainer.global_rank}", "w") as file:
            json.dump(record, file)


class SeedRecordingEngine(TransformersEngine):
    """The transformers engine, appending the per-sample seeds it samples with to a JSON file.

    The seeds are the ones the engine hands its per-sample ``torch.Generator``s, as it received
    them, so a test can check the streams a run actually used without recomputing them.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _generate_batch(self, prompts, seeds, sampling):  # noqa: ANN001, ANN202
        with open(self.path, "a") as file:
            file.write(json.dumps([int(seed) for seed in seeds]) + "\n")
        return super()._generate_batch(prompts, seeds, sampling)


class NonFiniteLoss(PolicyLoss):
    """GRPO whose loss is NaN on the optimiser steps in ``nan_steps`` (counted from 0).

    Stands in for a diverging run: the module must skip those steps, never apply them.
    """

    def __init__(self, nan_steps: list[int] | None = None, clip_low: float = 0.2,
                 clip_high: float = 0.2) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high)
        self.nan_steps = nan_steps or []
        self.step = 0

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        ratio = torch.exp(logp - old_logp)
        loss = -ratio * advantages
        return loss * float("nan") if self.step in self.nan_steps else loss


class CountSteps(Callback):
    """Tells a :class:`NonFiniteLoss` which optimiser step (batch) comes next."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loss = pl_module.loss_fn
        loss.step = trainer.current_epoch * trainer.num_training_batches + batch_idx


class SignalOnce(Callback):
    """Sends ``signal_name`` (e.g. ``"SIGTERM"``) to its own process in epoch ``epoch``, once.

    ``at="start"``: when the epoch starts, right after the previous epoch's checkpoint: a known
    point of the run, where a signal sent from outside arrives whenever a poll happens to see the
    checkpoint. ``at="end"``: at the end of the epoch; placed after ``CompletionsTable`` it fires
    after that epoch's completions are written and before its checkpoint (Lightning runs
    ``ModelCheckpoint`` last): the worst moment to die (``SIGKILL``). The ``marker`` file keeps a
    resumed run of the same config from being signalled again.
    """

    def __init__(self, signal_name: str, epoch: int, marker: str,
                 at: Literal["start", "end"] = "start") -> None:
        self.signal = signal.Signals[signal_name]
        self.epoch = epoch
        self.marker = marker
        self.at = at

    def _fire(self, trainer, at: str) -> None:
        if at == self.at and trainer.current_epoch == self.epoch and not Path(self.marker).exists():
            Path(self.marker).touch()
            os.kill(os.getpid(), self.signal)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._fire(trainer, "start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._fire(trainer, "end")


class WeightsDump(Callback):
    """Saves the policy's full (unsharded) state dict at the end of training, on rank 0.

    Peft's names (``base_model.model....q_proj.base_layer.weight``, ``...lora_A.default...``)
    without wrapper parts; gathered under FSDP1/FSDP2 (a collective on every rank).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        from dgpo.distributed import clean_name, full_weights

        named = full_weights(pl_module.policy) if pl_module.sharded else (
            (clean_name(k), v) for k, v in pl_module.policy.state_dict().items())
        weights = {name: tensor.detach().clone() for name, tensor in named}
        if trainer.is_global_zero:
            torch.save(weights, self.path)
