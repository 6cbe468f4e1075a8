"""Rollouts: engines (vLLM and Hugging Face ``generate``), the buffer and the rollout callback."""

from dgpo.rollout.buffer import RolloutBuffer, RolloutSample
from dgpo.rollout.callback import RolloutCallback
from dgpo.rollout.completions import CompletionsTable
from dgpo.rollout.engine import Completion, RolloutEngine, SamplingConfig
from dgpo.rollout.groups import RolloutRecord
from dgpo.rollout.transformers_engine import TransformersEngine
from dgpo.rollout.vllm_engine import VLLMEngine

__all__ = [
    "Completion",
    "CompletionsTable",
    "RolloutBuffer",
    "RolloutCallback",
    "RolloutEngine",
    "RolloutRecord",
    "RolloutSample",
    "SamplingConfig",
    "TransformersEngine",
    "VLLMEngine",
]
