"""A one-GPU check of the paths no CPU exercises, on a random R1-Distill-Qwen-1.5B (no weights).

Needs only PyTorch, Lightning, transformers and peft (no vLLM, math-verify, jsonargparse or
wandb): it imports dgpo's strategies, log-prob, LoRA, loss and transformers-engine modules and
nothing else of dgpo. The model is built with random weights from
``benchmarks/configs/r1-distill-qwen-1.5b.json`` (1.78B parameters, untied LM head). Sections:

- ``train``: one training step (dgpo's log-probs + DGPO loss, backward, clipping, AdamW) on one
  micro-batch of 8 sequences of 512 prompt + 1024 response tokens, fp32 weights with bf16
  compute (the paper configs' mixed precision), full fine-tuning and LoRA (r 16, all linear
  layers), with and without activation checkpointing, on one rank under FSDP1 (dgpo's
  ``CPUFSDPStrategy``, i.e. Lightning's ``FSDPStrategy`` on GPUs) and FSDP2 (dgpo's
  ``FSDP2Strategy``): median seconds and peak allocated memory of the timed steps.
- ``logprobs``: dgpo's chunked log-probs + entropy (forward + backward) against the naive
  ``log_softmax`` of the full logits, at vocabulary 151,936: time, peak memory, largest difference.
- ``generation``: the transformers engine's tokens/s at the paper's sampling settings
  (temperature 1, top-p 1, n 5, 512-token prompts, 1024 new tokens), bf16.
- ``sharing``: the recompute-safe prompt sharing (one prompt pass whose KV cache the group's
  samples share) under activation checkpointing, plain and FSDP2: values and gradients against
  the unshared path, fp32.

    make gpu-check                                        # = the command below
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out runs/gpu-check
    PYTHONPATH=. python3 benchmarks/gpu_check.py --tiny   # seconds; automatic without CUDA

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` and prints the Markdown. A case
that fails (e.g. out of memory) is reported with its error; the others still run. Sections stop
starting once ``--budget-s`` seconds have passed (default 420: the machine lends 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_lib beside this script

from gpu_check_lib import (  # noqa: E402
    CONFIG,
    LORA,
    PAPER,
    TINY,
    Sizes,
    build_model,
    environment,
    grouped_batch,
    guarded,
    peak_gib,
    reset_peak,
    shard,
    synchronize,
    to_markdown,
)

from dgpo.distributed import call_in_forward, full_weights  # noqa: E402
from dgpo.logprobs import sequence_logprobs, token_logprobs  # noqa: E402
from dgpo.lora import adapters_disabled, apply_lora, engine_weights  # noqa: E402
from dgpo.losses import DGPOLoss  # noqa: E402
from dgpo.optim import clip_grad_norm  # noqa: E402
from dgpo.rollout.engine import SamplingConfig  # noqa: E402
from dgpo.rollout.transformers_engine import TransformersEngine  # noqa: E402
from dgpo.strategies import _checkpoint_layers  # noqa: E402

SECTIONS = ("train", "lora_sync", "logprobs", "generation", "sharing")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without CUDA)")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for the JSON and Markdown")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args(argv)
    # FSDP1 + LoRA: one flat parameter per layer mixes frozen and trained weights (reported)
    warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    sizes = TINY if args.tiny or device.type == "cpu" else PAPER
    start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(device), "sizes": asdict(sizes)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    sections = {"train": check_training, "lora_sync": check_lora_sync,
                "logprobs": check_logprobs, "generation": check_generation,
                "sharing": check_sharing}
    try:
        for name in args.sections:
            if time.perf_counter() - start > args.budget_s:
                report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                continue
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            report[name] = sections[name](sizes, device)
    finally:
        dist.destroy_process_group()
    report["seconds_total"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print(markdown, flush=True)
    return report


# ------------------------------------------------------------------------------------ sections
def check_training(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    cases = []
    for strategy in ("fsdp1", "fsdp2"):
        for mode in ("full", "lora"):
            for checkpointing in (False, True):
                case = {"strategy": strategy, "mode": mode, "checkpointing": checkpointing}
                cases.append(guarded(case, lambda s=strategy, m=mode, c=checkpointing:
                                     train_case(sizes, device, s, m, c)))
    return cases


def train_case(sizes: Sizes, device: torch.device, strategy: str, mode: str,
               checkpointing: bool) -> dict[str, Any]:
    model = build_model(sizes, device, torch.float32).train()
    if mode == "lora":
        model = apply_lora(model, LORA)
    # bf16 compute on GPUs; CPUs compute bf16 several times slower, so the tiny run keeps fp32
    model = shard(model, strategy, checkpointing, device, mixed=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    vocab = model.config.vocab_size
    batch = grouped_batch(sizes.micro_batch, 1, sizes.prompt, sizes.response, vocab, device)
    mask = batch["response_mask"]
    advantages = torch.randn(mask.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    loss_fn = DGPOLoss()
    seconds, peaks = [], []
    for step in range(sizes.warmup + sizes.steps):  # warm-up also allocates optimiser states
        reset_peak(device)
        begin = time.perf_counter()
        logp, _ = call_in_forward(model, lambda inner: sequence_logprobs(
            inner, batch["input_ids"], batch["attention_mask"], mask, with_entropy=True,
            same_calls=True))
        out = loss_fn(logp, logp.detach(), advantages, mask, num_tokens=mask.sum(),
                      num_sequences=mask.shape[0])
        out.loss.backward()
        grad_norm = float(clip_grad_norm(model, 1.0))  # > 0: the trained weights get gradients
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= sizes.warmup:
            seconds.append(time.perf_counter() - begin)
            peaks.append(peak_gib(device))
        if not torch.isfinite(out.loss):
            raise RuntimeError(f"non-finite loss {out.loss.item()} at step {step}")
    tokens = int(batch["attention_mask"].sum())
    median = statistics.median(seconds)
    return {"compute": "bfloat16" if device.type == "cuda" else "float32",
            "seconds": round(median, 3), "peak_gib": peaks[-1],
            "tokens_per_s": round(tokens / median, 1),
            "trainable_params": sum(p.numel() for p in params), "grad_norm": grad_norm}


def check_lora_sync(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    return [guarded({"strategy": strategy}, lambda s=strategy: lora_sync_case(sizes, device, s))
            for strategy in ("fsdp1", "fsdp2")]


def lora_sync_case(sizes: Sizes, device: torch.device, strategy: str) -> dict[str, Any]:
    """A sharded LoRA policy (fp32, checkpointed layers) against itself before sharding.

    The engine's merged weights gathered from the shards, the reference log-probs with the
    adapters disabled, and a backward pass afterwards (the adapters must train again).
    """
    model = apply_lora(build_model(sizes, device, torch.float32), LORA)
    with torch.no_grad():  # adapters as after some training (B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    batch = grouped_batch(2, 1, sizes.prompt, sizes.response, model.config.vocab_size, device)

    def logprobs(model: torch.nn.Module) -> torch.Tensor:
        return call_in_forward(model, lambda inner: sequence_logprobs(
            inner, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
            with_entropy=False, same_calls=True))[0]

    expected = {name: tensor.clone() for name, tensor in engine_weights(model)}
    with torch.no_grad(), adapters_disabled(model):
        expected_reference = logprobs(model)
    model = shard(model, strategy, checkpointing=True, device=device, mixed=False)
    synchronize(device)
    begin = time.perf_counter()
    names, diff = [], 0.0
    for name, tensor in engine_weights(model, full_weights(model)):
        names.append(name)
        diff = max(diff, float((tensor - expected[name]).abs().max()))
    synchronize(device)
    seconds = time.perf_counter() - begin
    with torch.no_grad(), adapters_disabled(model):
        reference = logprobs(model)
    (logprobs(model) * batch["response_mask"]).sum().backward()
    return {"seconds": round(seconds, 3), "tensors": len(names),
            "same_names": sorted(names) == sorted(expected), "max_abs_diff": diff,
            "reference_max_abs_diff": float((reference - expected_reference).abs().max()),
            "grad_norm_after": float(clip_grad_norm(model, None))}


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, targets[:, None]).squeeze(-1), entropy


def check_logprobs(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    hidden_size = sizes.model.get("hidden_size") or json.loads(CONFIG.read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(sizes.logprob_tokens, hidden_size, generator=generator)
    weight = torch.randn(sizes.logprob_vocab, hidden_size, generator=generator) * 0.05
    targets = torch.randint(0, sizes.logprob_vocab, (sizes.logprob_tokens,), generator=generator)
    hidden, weight = (t.to(device, torch.bfloat16).requires_grad_() for t in (hidden, weight))
    targets = targets.to(device)
    grads = torch.randn(2, sizes.logprob_tokens, generator=generator).to(device)
    implementations = {
        "naive": naive_logprobs,
        "dgpo keep_gib=1": lambda h, w, t: token_logprobs(h, w, t, keep_gib=1.0),
        "dgpo keep_gib=0": lambda h, w, t: token_logprobs(h, w, t, keep_gib=0.0)}
    reference: torch.Tensor | None = None
    cases = []
    for name, function in implementations.items():
        def run(function=function) -> dict[str, Any]:
            nonlocal reference
            times, memory, logp = [], [], None
            for repeat in range(sizes.warmup + 2):
                hidden.grad = weight.grad = None
                before = reset_peak(device)
                begin = time.perf_counter()
                logp, entropy = function(hidden, weight, targets)
                ((logp * grads[0]).sum() + (entropy * grads[1]).sum()).backward()
                synchronize(device)
                if repeat >= sizes.warmup:
                    times.append(time.perf_counter() - begin)
                    peak = peak_gib(device)
                    memory.append(None if peak is None else round(peak - before, 2))
            assert logp is not None
            reference = logp.detach() if reference is None else reference
            return {"seconds": round(statistics.median(times), 4), "peak_gib": memory[-1],
                    "max_abs_diff_vs_naive": float((logp.detach() - reference).abs().max())}
        cases.append(guarded({"implementation": name, "tokens": sizes.logprob_tokens,
                              "vocab": sizes.logprob_vocab}, run))
    return cases


class _IdsTokenizer:
    """Just enough tokenizer for the engine on a model without one: ids are not decoded."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def check_generation(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(sizes, device, dtype).eval()
        engine = TransformersEngine(model=model, tokenizer=_IdsTokenizer(), max_batch_size=64)
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prompts = [torch.randint(10, vocab, (sizes.prompt,), generator=generator).tolist()
                   for _ in range(sizes.gen_prompts)]
        sampling = SamplingConfig(n=sizes.gen_n, temperature=1.0, top_p=1.0,
                                  max_new_tokens=sizes.gen_new_tokens, seed=0, ignore_eos=True)
        engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=4, seed=0,
                                                    ignore_eos=True))  # warm-up
        reset_peak(device)
        begin = time.perf_counter()
        completions = engine.generate(prompts, sampling)
        synchronize(device)
        seconds = time.perf_counter() - begin
        tokens = sum(len(c.token_ids) for c in completions)
        return {"seconds": round(seconds, 2), "tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 1), "peak_gib": peak_gib(device)}

    return guarded({"rows": sizes.gen_prompts * sizes.gen_n, "prompt": sizes.prompt,
                    "max_new_tokens": sizes.gen_new_tokens, "dtype": "bfloat16"
                    if device.type == "cuda" else "float32"}, run)


def check_sharing(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    cases = []
    for setup in ("checkpointing", "fsdp2+checkpointing"):
        cases.append(guarded({"setup": setup, "layers": sizes.share_layers},
                             lambda setup=setup: sharing_case(sizes, device, setup)))
    return cases


def sharing_case(sizes: Sizes, device: torch.device, setup: str) -> dict[str, Any]:
    model = build_model(sizes, device, torch.float32, layers=sizes.share_layers).train()
    if setup == "checkpointing":
        _checkpoint_layers(model, (type(model.get_decoder().layers[0]),))
    else:
        model = shard(model, "fsdp2", checkpointing=True, device=device, mixed=False)
    batch = grouped_batch(sizes.share_groups, sizes.share_n, sizes.share_prompt,
                          sizes.share_response, model.config.vocab_size, device, ragged=True)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for share in (False, True):
        logp, entropy = call_in_forward(model, lambda inner, share=share: sequence_logprobs(
            inner, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
            share_prompts=share, same_calls=True))
        weights = torch.linspace(-1, 1, logp.numel(), device=device).view_as(logp)
        ((logp * weights).sum() + (entropy * weights.flip(0)).sum()).backward()  # FSDP: .grad
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                 for p in params]
        model.zero_grad(set_to_none=True)
        results[share] = (logp.detach(), entropy.detach(), grads)
    (logp0, ent0, grads0), (logp1, ent1, grads1) = results[False], results[True]
    grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                    for a, b in zip(grads1, grads0, strict=True))
    diffs = {"logp_max_abs_diff": float((logp1 - logp0).abs().max()),
             "entropy_max_abs_diff": float((ent1 - ent0).abs().max()),
             "grad_max_rel_diff": grad_diff}
    return {**diffs, "equal": diffs["logp_max_abs_diff"] < 1e-4
            and diffs["entropy_max_abs_diff"] < 1e-4 and grad_diff < 1e-3}


if __name__ == "__main__":
    main()
