"""The arguments VLLMEngine hands to ``vllm.LLM`` (captured by a stand-in, no engine started)."""

from pathlib import Path
from typing import Any

import pytest

from dgpo.rollout import VLLMEngine


class _CapturedLLM:
    calls: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        _CapturedLLM.calls.append(kwargs)


def test_llm_kwargs_reach_vllm_and_override_the_engine_defaults(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    vllm = pytest.importorskip("vllm")
    monkeypatch.setattr(vllm, "LLM", _CapturedLLM)
    _CapturedLLM.calls.clear()
    engine = VLLMEngine(str(tmp_path), dtype="float32", max_model_len=256,
                        llm_kwargs={"enable_lora": True, "max_lora_rank": 16,
                                    "max_model_len": 128})
    engine.start()
    (kwargs,) = _CapturedLLM.calls
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 16
    assert kwargs["max_model_len"] == 128  # the passthrough wins over the engine's own value
    assert kwargs["model"] == str(tmp_path) and kwargs["dtype"] == "float32"
    engine._llm = None  # nothing was started: skip close()'s teardown
