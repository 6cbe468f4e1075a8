"""User-side plug-ins the end-to-end tests load by ``class_path``, as a user's own module would."""

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
    """Saves what the first optimiser step of epoch 0 saw, on rank 0, for the scale-out tests.

    The full (unsharded) gradient of every policy parameter just before the step, the global
    loss (the sum of the ranks' shares), the rollout buffer (the whole rollout, the same on every
    rank) and the buffer indices of the global mini-batch, so a test can recompute the step on
    one process from the same batch.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.grads: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.current_epoch == 0 and self.grads is None:
            self.grads = _full_gradients(pl_module.policy)  # collective: every rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != 0 or batch_idx != 0:
            return
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="sum")
        from dgpo.rollout.buffer import MiniBatchSampler

        buffer = trainer.datamodule.buffer
        indices = next(MiniBatchSampler(buffer).global_batches())
        if trainer.is_global_zero:
            torch.save({"grads": self.grads, "loss": float(loss), "indices": indices,
                        "samples": buffer.samples, "world_size": trainer.world_size}, self.path)


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
