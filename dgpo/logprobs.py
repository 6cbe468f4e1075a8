"""Per-token log-probabilities and entropy from hidden states, without full-vocabulary fp32 logits.

The naive route, ``log_softmax(model(x).logits.float())``, materialises a ``(tokens, vocab)``
float32 tensor for the whole batch — 151k × 8k tokens is 4.9 GB — and keeps it for the backward
pass. Here the language-model head is applied to ``chunk_size`` tokens at a time, in float32 per
chunk, and only the response tokens are projected at all. Under autograd each chunk is
checkpointed: its logits are recomputed in the backward pass instead of being stored, so peak
memory is one chunk's logits whatever the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits, dim=-1)
    entropy = log_norm - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                   temperature: float = 1.0, chunk_size: int = 1024,
                   with_entropy: bool = True) -> tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` and the entropy of the next-token distribution, per token.

    Args:
        hidden: final hidden states of the tokens to score, ``(N, H)``.
        weight: the language-model head, ``(V, H)``.
        targets: the next token of each position, ``(N,)``.
        bias: optional head bias, ``(V,)``.
        temperature: logits are divided by it (as the sampler does).
        chunk_size: tokens projected at once; peak memory is ``chunk_size × V`` floats.
        with_entropy: also return the entropy (zeros otherwise).

    Returns:
        ``(logp, entropy)``, each ``(N,)`` float32.

    Raises:
        ValueError: for a non-positive ``chunk_size`` or ``temperature``, or mismatched shapes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and targets (N,), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start:start + chunk_size], weight, bias, targets[start:start + chunk_size],
                temperature, with_entropy)
        if needs_grad:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


def sequence_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      response_mask: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024,
                      with_entropy: bool = True) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies of the response tokens of a batch of sequences.

    Only positions whose next token is a response token go through the language-model head.

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        input_ids: prompt + response token ids, right-padded, ``(B, L)``.
        attention_mask: 1 for real tokens, ``(B, L)``.
        response_mask: 1 where ``input_ids[:, 1:]`` is a response token, ``(B, L−1)``.
        temperature: sampling temperature the log-probs refer to.
        chunk_size: see :func:`token_logprobs`.
        with_entropy: also compute the entropy.

    Returns:
        ``(logp, entropy)``, each ``(B, L−1)`` float32, zero where ``response_mask`` is 0.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = response_mask.bool()
    positions = hidden[:, :-1][mask]
    targets = input_ids[:, 1:][mask]
    logp, entropy = token_logprobs(positions, head.weight, targets, bias=head.bias,
                                   temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=with_entropy)
    full_logp = hidden.new_zeros(mask.shape, dtype=torch.float32)
    full_entropy = hidden.new_zeros(mask.shape, dtype=torch.float32)
    return full_logp.masked_scatter(mask, logp), full_entropy.masked_scatter(mask, entropy)
