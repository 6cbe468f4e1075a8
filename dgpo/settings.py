"""Settings given as dicts (YAML, saved hyper-parameters): the one check of their keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def check_known_keys(cls: type, value: Mapping[str, Any], what: str,
                     noun: str = "settings") -> None:
    """Raise if ``value`` has a key that is not a field of the dataclass ``cls``.

    Args:
        cls: the dataclass the dict is for.
        value: the dict.
        what: what the settings are of, for the message (``"lora"``, ``"benchmark"``).
        noun: what the keys are called in the message.

    Raises:
        ValueError: naming the unknown keys and the valid ones, e.g. ``unknown lora settings
            ['rank']; valid settings: ['r', 'alpha', ...]``.
    """
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {noun} {unknown}; valid {noun}: {known}")
