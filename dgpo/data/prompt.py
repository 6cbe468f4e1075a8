"""A prompt ready for generation: its text, token ids, gold answer and source row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptSample:
    """One prompt ready for generation.

    Attributes:
        text: The formatted prompt text (chat template applied when enabled).
        prompt_ids: Its token ids, special tokens included exactly once.
        answer: The reference answer.
        columns: Every column of the source row (``problem``, ``answer``, ``id``, ...).

    """

    text: str
    prompt_ids: list[int]
    answer: str
    columns: dict[str, Any] = field(repr=False)
