"""Per-token log-probabilities and entropy from hidden states, without full-vocabulary fp32 logits.

The naive route, ``log_softmax(model(x).logits.float())``, materialises a ``(tokens, vocab)``
float32 tensor for the whole batch — 151k × 8k tokens is 4.9 GB — and autograd keeps several
such tensors (logits, log-softmax, probabilities) for the backward pass. Here the language-model
head is applied to ``chunk_size`` tokens at a time, in float32 per chunk, and only the response
tokens are projected at all. Under autograd a custom function saves, besides each token's
log-normaliser and entropy, only the log-softmax of as many whole chunks as fit in ``keep_gib``;
the backward pass recomputes the other chunks' logits one at a time and turns them into the
gradients of the hidden states and the head in place. With ``keep_gib=0`` peak memory is about
two chunks of logits whatever the sequence length, at the price of one extra head projection per
chunk; a budget that holds every chunk costs the naive path's three projections and one
``(tokens, vocab)`` tensor instead of several.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                  temperature: float) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def _chunk_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                   temperature: float, with_entropy: bool,
                   keep: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(logp, entropy, log_norm, log_probs)`` of one chunk.

    ``log_probs`` (the chunk's ``(n, V)`` log-softmax) is returned only when ``keep`` is set;
    otherwise the logits are freed on return.
    """
    logits = _chunk_logits(hidden, weight, bias, temperature)
    log_norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm
    if not with_entropy and not keep:
        return logp, torch.zeros_like(logp), log_norm, None
    log_probs = logits.sub_(log_norm[:, None])  # in place: the raw logits are not needed again
    if with_entropy:  # −Σ p log p, with one temporary of the chunk's size
        entropy = log_probs.exp().mul_(log_probs).sum(-1).neg_()
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy, log_norm, log_probs if keep else None


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunked head projection + log-softmax + entropy.

    The first ``keep_chunks`` chunks' log-softmax tensors are kept for the backward pass; the
    others are recomputed there from the hidden states, so that nothing else of vocabulary size
    is saved.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                temperature: float, chunk_size: int, with_entropy: bool,
                keep_chunks: int) -> tuple[Tensor, Tensor]:
        logps, entropies, norms, kept = [], [], [], []
        for index, start in enumerate(range(0, hidden.shape[0], chunk_size)):
            stop = start + chunk_size
            logp, entropy, log_norm, log_probs = _chunk_forward(
                hidden[start:stop], weight, bias, targets[start:stop], temperature, with_entropy,
                keep=index < keep_chunks)
            logps.append(logp)
            entropies.append(entropy)
            norms.append(log_norm)
            if log_probs is not None:
                kept.append(log_probs)
        logp, entropy = torch.cat(logps), torch.cat(entropies)
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(norms), entropy, *kept)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):
        hidden, weight, bias, targets, log_norm, entropy, *kept = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # the head's gradient sums over all chunks: accumulate it in at least float32
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = (torch.zeros_like(bias, dtype=accumulate)
                     if need_bias and bias is not None else None)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        for index, start in enumerate(range(0, hidden.shape[0], ctx.chunk_size)):
            stop = start + ctx.chunk_size
            h = hidden[start:stop]
            # d logp_y / d z = onehot(y) − p;  d H / d z = −p ⊙ (log p + H)   (z = logits / T)
            if index < len(kept):  # kept: read only (a second backward may need it again)
                log_probs = kept[index]
                probs = log_probs.exp()
                shifted = log_probs + entropy[start:stop, None] if use_entropy else None
            else:  # recomputed: ours to overwrite
                log_probs = _chunk_logits(h, weight, bias, ctx.temperature)
                log_probs.sub_(log_norm[start:stop, None])
                probs = log_probs.exp()
                shifted = log_probs.add_(entropy[start:stop, None]) if use_entropy else None
            g_logp = grad_logp[start:stop, None].float()
            if shifted is not None:
                grad_z = shifted.mul_(probs).mul_(-grad_entropy[start:stop, None].float())
                grad_z.sub_(probs.mul_(g_logp))
            else:
                grad_z = probs.mul_(-g_logp)
            grad_z.scatter_add_(-1, targets[start:stop, None], g_logp)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_z @ weight
            if grad_weight is not None and accumulate == weight.dtype:
                grad_weight.addmm_(grad_z.t(), h.to(weight.dtype))
            elif grad_weight is not None:  # bf16/fp16 head: matmul in its dtype, sum in fp32
                grad_weight += grad_z.t() @ h.to(weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                   temperature: float = 1.0, chunk_size: int = 512,
                   with_entropy: bool = True, keep_gib: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` and the entropy of the next-token distribution, per token.

    Args:
        hidden: final hidden states of the tokens to score, ``(N, H)``.
        weight: the language-model head, ``(V, H)``.
        targets: the next token of each position, ``(N,)``.
        bias: optional head bias, ``(V,)``.
        temperature: logits are divided by it (as the sampler does).
        chunk_size: tokens projected at once; peak memory is about ``2 × chunk_size × V`` floats.
        with_entropy: also return the entropy (zeros otherwise).
        keep_gib: under autograd, the log-softmax of whole chunks, up to this many GiB, is kept
            for the backward pass; the other chunks' logits are recomputed there (one more head
            projection each). ``0`` keeps nothing of vocabulary size (least memory); a budget
            that holds all chunks does the same matmuls as the naive path.

    Returns:
        ``(logp, entropy)``, each ``(N,)`` float32; differentiable in ``hidden``, ``weight`` and
        ``bias``.

    Raises:
        ValueError: for a non-positive ``chunk_size`` or ``temperature``, or mismatched shapes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not keep_gib >= 0:
        raise ValueError(f"keep_gib must be >= 0, got {keep_gib}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and targets (N,), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    tensors = (hidden, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        chunk_bytes = min(chunk_size, hidden.shape[0]) * weight.shape[0] * 4  # float32
        keep_chunks = int(keep_gib * 2**30 // chunk_bytes)
        return _ChunkedLogprobs.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      with_entropy, keep_chunks)
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        logp, entropy, _, _ = _chunk_forward(hidden[start:stop], weight, bias,
                                             targets[start:stop], temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies)


def sequence_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      response_mask: Tensor, *, temperature: float = 1.0, chunk_size: int = 512,
                      with_entropy: bool = True, keep_gib: float = 1.0,
                      share_prompts: bool = False,
                      same_calls: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies of the response tokens of a batch of sequences.

    Only positions whose next token is a response token go through the language-model head.
    With ``share_prompts``, rows with the same prompt (the ``n`` samples of a group) run it
    through the model once (see :func:`_shared_prompt_hidden`).

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        input_ids: prompt + response token ids, right-padded, ``(B, L)``.
        attention_mask: 1 for real tokens, ``(B, L)``.
        response_mask: 1 where ``input_ids[:, 1:]`` is a response token, ``(B, L−1)``; each row's
            response tokens follow its prompt without gaps.
        temperature: sampling temperature the log-probs refer to.
        chunk_size: see :func:`token_logprobs`.
        with_entropy: also compute the entropy.
        keep_gib: see :func:`token_logprobs`.
        share_prompts: run each distinct prompt once, with a KV cache shared by its rows. Same
            numbers up to float rounding; needs a model that accepts ``past_key_values`` (not
            Hugging Face's gradient checkpointing while training: it drops the cache; checkpoint
            wrappers are fine) and only full-attention layers (else the plain path runs).
        same_calls: with ``share_prompts``, call the decoder exactly twice whatever the batch
            (no repeated prompt, responses of at most one token). Under FSDP every call gathers
            parameters collectively, so every rank must make the same calls.

    Returns:
        ``(logp, entropy)``, each ``(B, L−1)`` float32, zero where ``response_mask`` is 0.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    mask = response_mask.bool()
    shared = _shared_prompt_hidden(decoder, input_ids, attention_mask, mask, same_calls) \
        if share_prompts else None
    if shared is not None:
        positions, targets = shared
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = hidden[:, :-1][mask]
        targets = input_ids[:, 1:][mask]
    logp, entropy = token_logprobs(positions, head.weight, targets, bias=head.bias,
                                   temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=with_entropy, keep_gib=keep_gib)
    full_logp = logp.new_zeros(mask.shape)
    full_entropy = entropy.new_zeros(mask.shape)
    return full_logp.masked_scatter(mask, logp), full_entropy.masked_scatter(mask, entropy)


def _prompt_cache(num_layers: int) -> Any:
    """An empty KV cache whose layers keep only their latest states.

    A decoder layer that activation checkpointing recomputes in the backward pass writes its
    states again; appending them (as a ``DynamicCache`` does) would double the prompt.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class OverwriteLayer(DynamicLayer):
        def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
                   **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    cache = DynamicCache()
    cache.layers = [OverwriteLayer() for _ in range(num_layers)]
    return cache


def _response_cache(prompt_cache: Any, index: Tensor) -> Any:
    """A KV cache holding row ``index[i]`` of ``prompt_cache`` as row ``i``'s fixed prefix.

    Each update returns the prefix followed by the new states without storing them, so a
    recomputed layer sees exactly what it saw the first time. The prefix tensors are the prompt
    pass's own outputs: gradients flow back through them into the prompt.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PrefixLayer(DynamicLayer):
        def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
                   **kwargs: Any) -> tuple[Tensor, Tensor]:
            return (torch.cat([self.keys, key_states], dim=-2),
                    torch.cat([self.values, value_states], dim=-2))

    cache = DynamicCache()
    cache.layers = []
    for source in prompt_cache.layers:
        layer = PrefixLayer()
        layer.lazy_initialization(source.keys, source.values)
        layer.keys, layer.values = source.keys[index], source.values[index]
        cache.layers.append(layer)
    return cache


def _shared_prompt_hidden(decoder: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                          response_mask: Tensor,
                          same_calls: bool = False) -> tuple[Tensor, Tensor] | None:
    """Hidden states predicting each response token, running every distinct prompt once.

    The distinct prompts go through the decoder once, left-padded, keeping their KV cache; the
    cache is repeated for the rows of each prompt, and the responses (right-padded) run on top
    of it. The hidden state that predicts a row's first response token is its prompt's last
    one. Returns ``(hidden, targets)`` for the positions of ``response_mask`` in row-major order
    (as ``hidden[:, :-1][response_mask]`` would be), or ``None`` when no prompt repeats
    (unless ``same_calls``: then the decoder always runs twice, see :func:`sequence_logprobs`)
    or the model has sliding-window layers. Both caches are safe under activation
    checkpointing (see :func:`_prompt_cache` and :func:`_response_cache`).
    """
    layer_types = getattr(decoder.config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return None  # sliding-window layers: each would need its own prefix cache
    rows, length = input_ids.shape
    has_response = response_mask.any(-1)
    # a row's prompt ends where its first response target starts (response_mask is shifted)
    prompt_lengths = torch.where(has_response, response_mask.int().argmax(-1) + 1,
                                 attention_mask.sum(-1)).tolist()
    keys: dict[tuple[int, ...], int] = {}
    row_prompt = [keys.setdefault(tuple(input_ids[i, :prompt_lengths[i]].tolist()), len(keys))
                  for i in range(rows)]
    if len(keys) == rows and not same_calls:
        return None
    device = input_ids.device
    width = max(prompt_lengths)
    prompts = input_ids.new_zeros((len(keys), width))
    prompt_mask = attention_mask.new_zeros((len(keys), width))
    for prompt, index in keys.items():  # left padding: every prompt ends in the last column
        prompts[index, width - len(prompt):] = torch.tensor(prompt, device=device)
        prompt_mask[index, width - len(prompt):] = 1
    cache = _prompt_cache(decoder.config.num_hidden_layers)
    out = decoder(input_ids=prompts, attention_mask=prompt_mask,
                  position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
                  use_cache=True)
    if not all(layer.is_initialized for layer in cache.layers):  # Hugging Face's gradient
        # checkpointing drops the cache while training
        raise RuntimeError("share_prompts needs the model's KV cache (turn Hugging Face's "
                           "gradient checkpointing off, or share_prompts off)")
    index = torch.tensor(row_prompt, device=device)
    cache = _response_cache(cache, index)
    starts = torch.tensor(prompt_lengths, device=device)
    response_lengths = attention_mask.sum(-1) - starts
    span = int(response_lengths.max())
    steps = torch.arange(max(span, 1), device=device)  # span 0: no target is selected below
    response_ids = input_ids.gather(1, (starts[:, None] + steps).clamp(max=length - 1))
    in_response = steps < response_lengths[:, None]
    last_prompt_hidden = out.last_hidden_state[:, -1][index]  # predicts response token 0
    if span > 1:
        hidden = decoder(input_ids=response_ids[:, :-1],
                         attention_mask=torch.cat([prompt_mask[index], in_response[:, :-1]
                                                   .to(prompt_mask.dtype)], dim=1),
                         position_ids=starts[:, None] + steps[:-1], past_key_values=cache,
                         use_cache=True).last_hidden_state
        hidden = torch.cat([last_prompt_hidden[:, None], hidden], dim=1)
    else:
        hidden = last_prompt_hidden[:, None]
        if same_calls:  # the second call of the other ranks, on one token; its output unused
            extra = decoder(input_ids=response_ids[:, :1],
                            attention_mask=torch.cat([prompt_mask[index],
                                                      prompt_mask.new_ones((rows, 1))], dim=1),
                            position_ids=starts[:, None], past_key_values=cache,
                            use_cache=True).last_hidden_state
            hidden = hidden + 0.0 * extra  # in the graph, so FSDP's backward hooks all run
    # response_mask restricted to each row's response span, in the same row-major order
    targets_mask = response_mask.gather(1, (starts[:, None] - 1 + steps).clamp(max=length - 2))
    targets_mask &= in_response
    return hidden[targets_mask], response_ids[targets_mask]
