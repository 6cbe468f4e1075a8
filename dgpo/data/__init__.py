"""Prompts for RL: problem files, synthetic tasks, prompt templates and the datamodule."""

from dgpo.data.datamodule import RLVRDataModule
from dgpo.data.problems import load_problems
from dgpo.data.prompt import PromptSample
from dgpo.data.synthetic import ArithmeticTask, arithmetic_problems
from dgpo.data.templates import DEFAULT_TEMPLATE, format_prompt

__all__ = [
    "DEFAULT_TEMPLATE",
    "ArithmeticTask",
    "PromptSample",
    "RLVRDataModule",
    "arithmetic_problems",
    "format_prompt",
    "load_problems",
]
