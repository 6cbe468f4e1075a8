import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dgpo.logprobs import sequence_logprobs, token_logprobs


def naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T).float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_match_naive_values_and_gradients(chunk_size, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (50,), generator=g)
    upstream = torch.randn(50, generator=g, dtype=torch.float64)

    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature,
                                   chunk_size=chunk_size)
    grads = torch.autograd.grad((logp * upstream).sum() + entropy.sum(), (hidden, weight))
    ref_logp, ref_entropy = naive(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad((ref_logp * upstream).sum() + ref_entropy.sum(),
                                    (hidden, weight))
    torch.testing.assert_close(logp, ref_logp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_entropy", [True, False])
def test_token_logprobs_gradients_with_bias_and_independent_upstreams(use_entropy):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(33, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(33, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 33, (40,), generator=g)
    up_logp, up_entropy = torch.randn(2, 40, generator=g, dtype=torch.float64)

    def objective(logp, entropy):
        return (logp * up_logp).sum() + ((entropy * up_entropy).sum() if use_entropy else 0)

    # 5 chunks of 9 x 33 floats: keep the first 2, recompute the other 3
    logp, entropy = token_logprobs(hidden, weight, targets, bias=bias, chunk_size=9,
                                   temperature=0.7, keep_gib=2.5 * 9 * 33 * 4 / 2**30)
    grads = torch.autograd.grad(objective(logp, entropy), (hidden, weight, bias))
    logits = (hidden @ weight.T + bias) / 0.7
    logp_all = torch.log_softmax(logits, -1)
    ref = (logp_all.gather(-1, targets[:, None]).squeeze(-1),
           -(logp_all.exp() * logp_all).sum(-1))
    ref_grads = torch.autograd.grad(objective(*ref), (hidden, weight, bias))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_saves_no_vocabulary_sized_tensor_for_backward():
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logp, entropy = token_logprobs(hidden, weight, torch.zeros(64, dtype=torch.long),
                                       chunk_size=16, keep_gib=0)
    (logp.sum() + entropy.sum()).backward()
    assert max(saved) == weight.numel()  # the head itself; nothing of size tokens × vocab
    assert hidden.grad is not None and weight.grad is not None


def test_token_logprobs_keeps_whole_chunks_within_its_budget():
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logprobs(hidden, weight, torch.zeros(64, dtype=torch.long), chunk_size=16,
                       keep_gib=3.5 * 16 * 1000 * 4 / 2**30)
    assert saved.count((16, 1000)) == 3  # three whole chunks fit in 3.5 chunks' worth


def test_token_logprobs_upcasts_bf16_chunks_to_float32():
    hidden = torch.randn(8, 16).bfloat16()
    weight = torch.randn(50, 16).bfloat16()
    logp, entropy = token_logprobs(hidden, weight, torch.zeros(8, dtype=torch.long))
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32


def test_token_logprobs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_logprobs(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long),
                       chunk_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long),
                       temperature=0.0)


def test_sequence_logprobs_match_the_full_forward_on_response_tokens():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    model = Qwen2ForCausalLM(config).eval()
    input_ids = torch.randint(0, 120, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[2, 9:] = 0
    response_mask = torch.zeros(3, 11, dtype=torch.bool)
    response_mask[:, 5:] = True
    response_mask[2, 8:] = False
    logp, entropy = sequence_logprobs(model, input_ids, attention_mask, response_mask,
                                      chunk_size=4)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    full = torch.log_softmax(logits, -1)
    expected = full.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expected_entropy = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(logp[response_mask], expected[response_mask], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(entropy[response_mask], expected_entropy[response_mask],
                               rtol=1e-5, atol=1e-5)
    assert torch.all(logp[~response_mask] == 0)


def grouped_batch(generator):
    """Two prompts of different lengths with 3 samples each, one lone prompt, one empty response."""
    prompts = [torch.randint(0, 120, (n,), generator=generator).tolist() for n in (4, 7, 5)]
    rows = [(0, 3), (0, 6), (0, 1), (1, 5), (1, 2), (1, 0), (2, 4)]  # (prompt, response length)
    width = max(len(prompts[p]) + r for p, r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        tokens = prompts[p] + torch.randint(0, 120, (r,), generator=generator).tolist()
        input_ids[i, :len(tokens)] = torch.tensor(tokens)
        attention_mask[i, :len(tokens)] = 1
        response_mask[i, len(prompts[p]) - 1:len(tokens) - 1] = True
    return input_ids, attention_mask, response_mask


def test_shared_prompts_give_the_same_logprobs_and_gradients():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    model = Qwen2ForCausalLM(config).double().train()
    batch = grouped_batch(torch.Generator().manual_seed(1))
    upstream = torch.randn(2, *batch[2].shape, dtype=torch.float64)
    results = []
    for share in (False, True):
        model.zero_grad()
        logp, entropy = sequence_logprobs(model, *batch, chunk_size=4, share_prompts=share)
        ((logp * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
        results.append((logp, entropy, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp, entropy, grads), (shared_logp, shared_entropy, shared_grads) = results
    assert (logp[batch[2]] != 0).all()
    torch.testing.assert_close(shared_logp, logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shared_entropy, entropy, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        # the head works in float32: float32 rounding, summed in another order
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_prompts_fall_back_when_no_prompt_repeats():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=120, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    model = Qwen2ForCausalLM(config).eval()
    input_ids, attention_mask, response_mask = (t[[0, 3, 6]] for t in
                                                grouped_batch(torch.Generator().manual_seed(2)))
    plain = sequence_logprobs(model, input_ids, attention_mask, response_mask)
    shared = sequence_logprobs(model, input_ids, attention_mask, response_mask,
                               share_prompts=True)
    torch.testing.assert_close(shared, plain, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [[0, 3, 6], [2, 5], [5], [0, 1, 2]],
                         ids=["no-repeat", "short-responses", "no-response", "one-group"])
def test_same_calls_run_the_decoder_twice_with_the_same_numbers(rows):
    """Under FSDP every rank must call the decoder as often, whatever its micro-batch holds."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=120, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    model = Qwen2ForCausalLM(config).double().train()
    batch = tuple(t[rows] for t in grouped_batch(torch.Generator().manual_seed(2)))
    calls = []
    model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    results = []
    for share, same_calls in ((False, False), (True, True)):
        model.zero_grad()
        calls.clear()
        logp, _ = sequence_logprobs(model, *batch, share_prompts=share, same_calls=same_calls)
        if logp.requires_grad:
            logp.sum().backward()
        results.append((logp, [p.grad for p in model.parameters()], len(calls)))
    (logp, grads, plain_calls), (same_logp, same_grads, same_calls_made) = results
    assert plain_calls == 1 and same_calls_made == 2
    torch.testing.assert_close(same_logp, logp, rtol=1e-6, atol=1e-6)
    for grad, same_grad in zip(grads, same_grads, strict=True):
        if grad is None:  # no response token at all: nothing to differentiate
            assert same_grad is None or not same_grad.any()
        else:
            torch.testing.assert_close(same_grad, grad, rtol=1e-5, atol=1e-6)


def test_shared_prompts_survive_activation_checkpointing():
    """Recomputed layers (the strategies' checkpoint wrappers) see the same KV cache again."""
    from dgpo.strategies import _checkpoint_layers

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    reference = Qwen2ForCausalLM(config).double().train()
    model = Qwen2ForCausalLM(config).double().train()
    model.load_state_dict(reference.state_dict())
    _checkpoint_layers(model, (type(model.model.layers[0]),))
    batch = grouped_batch(torch.Generator().manual_seed(1))
    results = []
    for net, share in ((reference, False), (model, True)):
        logp, entropy = sequence_logprobs(net, *batch, share_prompts=share)
        (logp.sum() + entropy.sum()).backward()
        grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad
                 for name, p in net.named_parameters()}
        results.append((logp, grads))
    (logp, grads), (shared_logp, shared_grads) = results
    torch.testing.assert_close(shared_logp, logp, rtol=1e-6, atol=1e-6)
    assert set(shared_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_prompts_refuse_hugging_face_gradient_checkpointing():
    config = Qwen2Config(vocab_size=120, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    model = Qwen2ForCausalLM(config).train()
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="share_prompts needs the model's KV cache"):
        sequence_logprobs(model, *grouped_batch(torch.Generator().manual_seed(1)),
                          share_prompts=True)
