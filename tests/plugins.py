"""User-side plug-ins the end-to-end tests load by ``class_path``, as a user's own module would."""

import torch
from lightning.pytorch import Callback
from torch import Tensor

from dgpo.losses import PolicyLoss


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
