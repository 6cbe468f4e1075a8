"""The rollout engine contract: sample completions, take new weights, score sequences.

An engine turns token-id prompts into :class:`Completion` objects (``n`` per prompt, prompt-major
order) and reports the sampled tokens' log-probabilities under the *raw* model distribution (no
temperature or top-p applied), which is what importance ratios need. ``load_weights`` pushes the
policy's current parameters (Hugging Face names) and ``score`` recomputes per-token log-probs under
the engine's current weights, so a trainer can check that a weight sync really happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingConfig:
    """How to sample completions.

    Sample ``k`` of prompt ``i`` uses the seed ``seed + i * n + k`` (see :meth:`sample_seed`), so
    seeded generation is reproducible and no two samples of one call share a random stream. Change
    ``seed`` between rollouts (e.g. ``seed + epoch``) to get fresh samples.

    Raises:
        ValueError: if a field is outside its allowed range.

    Example:
        >>> SamplingConfig(n=4, temperature=0.7, max_new_tokens=64, seed=1).sample_seed(2, 3)
        12

    """

    n: int = 8
    """Completions per prompt (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (>= 0; 0 means greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    max_new_tokens: int = 256
    """Largest number of generated tokens per completion (>= 1)."""
    seed: int | None = None
    """Base seed (>= 0), or None for unseeded sampling."""
    ignore_eos: bool = False
    """Keep sampling past end-of-sequence tokens until ``max_new_tokens`` (fixed work per
    completion, for benchmarks)."""

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n must be an integer >= 1, got {self.n!r}.")
        if not self.temperature >= 0:
            raise ValueError(
                f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                "SamplingConfig.max_new_tokens must be an integer >= 1, "
                f"got {self.max_new_tokens!r}."
            )
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(
                f"SamplingConfig.seed must be None or an integer >= 0, got {self.seed!r}."
            )

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """Return the seed of sample ``sample_index`` of prompt ``prompt_index``, or None."""
        if self.seed is None:
            return None
        return self.seed + prompt_index * self.n + sample_index


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``token_ids`` include the stop token when the completion ended at one (``finish_reason ==
    "stop"``); ``text`` is decoded without special tokens.
    """

    prompt_index: int
    """Index of the prompt in the ``prompt_ids`` given to :meth:`RolloutEngine.generate`."""
    token_ids: list[int]
    """Generated token ids, shape ``(T,)``."""
    text: str
    """Decoded completion (special tokens skipped)."""
    finish_reason: FinishReason
    """``"length"`` when ``max_new_tokens`` was reached, else ``"stop"``."""
    logprobs: list[float] | None
    """Log-prob of each generated token under the raw model distribution, shape ``(T,)``."""


class RolloutEngine(ABC):
    """Generates completions for the policy and keeps its weights in sync.

    Engines are context managers: ``with VLLMEngine(path) as engine: ...`` closes them.
    """

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt.

        Args:
            prompt_ids: token ids of each prompt (non-empty lists).
            sampling: how to sample.

        Returns:
            ``len(prompt_ids) * sampling.n`` completions in prompt-major order: the completions of
            prompt 0, then those of prompt 1, and so on.

        """

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (Hugging Face parameter names, any dtype or device)."""

    @abstractmethod
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first, under the engine's current weights.

        Args:
            sequences: full token sequences (prompt + completion).

        Returns:
            For each sequence of length ``L``, ``L - 1`` log-probs: entry ``t`` is
            ``log p(sequence[t + 1] | sequence[: t + 1])``.

        """

    def attach(self, module: torch.nn.Module | None, model_path: str) -> None:  # noqa: B027
        """Tell the engine which policy it serves (the rollout callback calls this each rollout).

        Engines built without a model adopt these: the module itself (``TransformersEngine``) or
        the path of its initial weights (``VLLMEngine``). A no-op by default.

        Args:
            module: the policy module (Hugging Face causal LM), or None when it cannot be sampled
                from directly (its parameters are sharded over ranks): the engine then loads its
                own copy from ``model_path`` and receives the weights by :meth:`load_weights`.
            model_path: the folder (or hub id) the policy was loaded from.

        """

    def ranks_per_engine(self, world_size: int) -> int:
        """How many of the trainer's ``world_size`` ranks one engine spans (1 by default).

        The rollout callback gives every engine an equal share of the prompts; the ranks of one
        engine all receive the same share.
        """
        return 1

    def sleep(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release accelerator memory between rollouts (a no-op unless the engine supports it)."""

    def wake_up(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Undo :meth:`sleep`."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Free the engine's resources; the engine must not be used afterwards."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def check_prompts(prompt_ids: Sequence[Sequence[int]], name: str = "prompt_ids") -> None:
    """Raise ``ValueError`` unless every prompt is a non-empty list of token ids."""
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"{name}[{index}] is empty; every sequence needs at least one token.")
