"""What the rollout callback may ask of the LightningModule: a typed, read-only interface.

The callback reads the module through :class:`RolloutPolicy` and never sets attributes on it;
everything the module needs from the rollout (samples, advantages, behaviour log-probs) reaches it
through the training batches. :class:`~dgpo.module.RLVRModule` implements it; a user's module
that implements these members works with :class:`~dgpo.rollout.RolloutCallback` too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dgpo.rollout.buffer import RolloutSample


@runtime_checkable
class RolloutPolicy(Protocol):
    """The policy side of a rollout (see the module docstring).

    Under FSDP and DDP, :meth:`named_weights_for_engine` and :meth:`score_samples` are
    collectives: every rank calls them.
    """

    @property
    def tokenizer(self) -> Any:
        """The policy's Hugging Face tokenizer."""
        ...

    @property
    def model_path(self) -> str:
        """The folder (or hub id) of the initial policy weights (an engine's own copy)."""
        ...

    @property
    def sampling_temperature(self) -> float:
        """The temperature the training log-probs use; the rollout must sample with it."""
        ...

    @property
    def can_defer_old_logp(self) -> bool:
        """Whether the first mini-batch's training pass may give its behaviour log-probs."""
        ...

    @property
    def has_reference(self) -> bool:
        """Whether ``score_samples(..., reference=True)`` is available (a KL penalty is on)."""
        ...

    def policy_for_engine(self) -> torch.nn.Module | None:
        """The module an engine may sample from in place, or None (sharded: use a copy)."""
        ...

    def named_weights_for_engine(self) -> Iterator[tuple[str, Tensor]]:
        """The policy's full weights by Hugging Face name, one tensor at a time."""
        ...

    def score_samples(self, samples: list[RolloutSample], reference: bool = False,
                      temperature: float | None = None) -> list[Tensor]:
        """Per-token log-probs of each sample's response under the policy (or reference)."""
        ...


def check_rollout_policy(module: object) -> RolloutPolicy:
    """``module`` as a :class:`RolloutPolicy`, or a ``TypeError`` naming what it lacks."""
    missing = [name for name in ("tokenizer", "model_path", "sampling_temperature",
                                 "can_defer_old_logp", "has_reference", "policy_for_engine",
                                 "named_weights_for_engine", "score_samples")
               if not hasattr(type(module), name)]
    if missing:
        raise TypeError(f"{type(module).__name__} cannot serve rollouts: it lacks "
                        f"{', '.join(missing)} (see dgpo.rollout.policy.RolloutPolicy)")
    return module  # type: ignore[return-value]  # checked member by member above
