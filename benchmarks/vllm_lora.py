"""Serving a LoRA policy with vLLM on CPU: merged weights against vLLM's own LoRA adapters.

dgpo hands its engine the current LoRA policy as merged weights (``dgpo.lora.engine_weights``:
``W + alpha / r · B @ A`` per adapted layer, loaded with ``VLLMEngine.load_weights``). vLLM can
also serve the adapters themselves (``enable_lora``, a ``LoRARequest`` per generation), which
moves only the adapters but adds the LoRA matmuls to every generated token. Each mode runs in a
fresh process with the quickstart's engine settings (float32, eager) and, per iteration, pushes
a changed policy (the adapters' ``B`` perturbed, as an optimiser step would) and generates one
rollout: ``--prompts`` prompts × ``--n`` samples of exactly ``--tokens`` tokens (``ignore_eos``).
It also checks that both modes serve the same policy: the greedy completions of the last
iteration's policy, token for token.

    python benchmarks/vllm_lora.py                                  # SmolLM2-135M, r 16
    python benchmarks/vllm_lora.py --model builtin:tiny-qwen2 --iterations 2

Last line per mode: a JSON record; then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

MODES = ("merged", "adapters")
#: The ranks vLLM's ``max_lora_rank`` accepts (it must be at least the adapters' ``r``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=4, help="the first is a warm-up")
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(args)), flush=True)
        return
    records = []
    for mode in MODES:
        command = [sys.executable, __file__, "--run", mode, "--model", args.model,
                   "--r", str(args.r), "--prompts", str(args.prompts), "--n", str(args.n),
                   "--tokens", str(args.tokens), "--iterations", str(args.iterations)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"mode {mode} failed:\n{done.stderr[-4000:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    same = records[0]["greedy"] == records[1]["greedy"]
    print(f"\n{args.prompts} prompts x {args.n} samples x {args.tokens} tokens per iteration, "
          f"median of {args.iterations - 1} iterations after a warm-up; greedy completions of "
          f"both modes identical: {same}\n")
    print("| mode | push s | generate s | iteration s | tokens/s | engine start s |")
    print("|---|---|---|---|---|---|")
    for record in records:
        print(f"| {record['mode']} | {record['push_s']:.2f} | {record['generate_s']:.2f} | "
              f"{record['iteration_s']:.2f} | {record['tokens_per_s']:.0f} | "
              f"{record['start_s']:.1f} |")


def measure(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from dgpo.lora import LoraSettings, apply_lora, engine_weights
    from dgpo.models import resolve_model
    from dgpo.rollout import VLLMEngine

    torch.manual_seed(0)
    path = resolve_model(args.model)
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                        LoraSettings(r=args.r, alpha=2.0 * args.r))
    lora_b = [p for name, p in policy.named_parameters() if "lora_B" in name]
    adapters = args.run == "adapters"
    max_rank = min(rank for rank in VLLM_LORA_RANKS if rank >= args.r)
    llm_kwargs = ({"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1}
                  if adapters else {})
    start = time.perf_counter()
    engine = VLLMEngine(path, dtype="float32", max_model_len=512, kv_cache_space_gib=1.0,
                        progress_bar=False, llm_kwargs=llm_kwargs)
    engine.start()
    start_s = time.perf_counter() - start
    vocab = policy.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(10, vocab, (32,),
                                                           generator=generator).tolist())
               for _ in range(args.prompts)]
    sampled = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.tokens, seed=0,
                             ignore_eos=True)
    folder = tempfile.mkdtemp(prefix="dgpo-vllm-lora-")
    push_s, generate_s = [], []
    request = None
    for iteration in range(args.iterations):
        with torch.no_grad():  # a changed policy, as after an optimiser step
            for weight in lora_b:
                weight.add_(torch.randn_like(weight) * 1e-3)
        tick = time.perf_counter()
        if adapters:  # only the adapters move; vLLM reloads them in place on the next request
            policy.save_pretrained(folder)
            request = LoRARequest("policy", 1, folder, load_inplace=True)
        else:
            engine.load_weights(engine_weights(policy))
        tock = time.perf_counter()
        engine.llm.generate(prompts, sampled, lora_request=request, use_tqdm=False)
        done = time.perf_counter()
        if iteration:  # the first iteration warms up
            push_s.append(tock - tick)
            generate_s.append(done - tock)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=16)
    outputs = engine.llm.generate(prompts[:4], greedy, lora_request=request, use_tqdm=False)
    engine.close()
    shutil.rmtree(folder)
    push, generate = statistics.median(push_s), statistics.median(generate_s)
    tokens = args.prompts * args.n * args.tokens
    return {"mode": args.run, "model": args.model, "r": args.r, "push_s": push,
            "generate_s": generate, "iteration_s": push + generate,
            "tokens_per_s": tokens / generate, "start_s": start_s,
            "greedy": [list(o.outputs[0].token_ids) for o in outputs]}


if __name__ == "__main__":
    main()
