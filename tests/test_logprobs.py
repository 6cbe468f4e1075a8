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
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
