"""Full fine-tuning against LoRA on CPU: seconds per training step, peak memory, weight sync.

Each mode runs in a fresh process (peak RSS is per process): the policy (fp32) is loaded, LoRA
(r ``--r``, all linear layers) applied for ``lora``, then ``--steps`` training steps after one
warm-up — dgpo's log-probs (``sequence_logprobs``) + DGPO loss, backward, clipping, AdamW over
the trainable parameters — on one micro-batch of ``--rows`` sequences of ``--prompt`` +
``--response`` tokens. For LoRA it also times the two ways of handing the engine the current
policy under the base model's names: merging on the fly (``dgpo.lora.engine_weights``,
``W + scale · B @ A`` per adapted layer, the policy untouched) and peft's
``merge_adapter()`` / ``state_dict`` / ``unmerge_adapter()``, with the drift the latter leaves
in the base weights after one round trip.

    python benchmarks/lora_step.py                       # SmolLM2-135M, full and LoRA r 16
    python benchmarks/lora_step.py --rows 8 --prompt 128 --response 512 --steps 5

Last line per mode: a JSON record.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--run", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(args)), flush=True)
        return
    from dgpo.models import resolve_model

    model = resolve_model(args.model)
    for mode in args.modes:
        command = [sys.executable, __file__, "--run", mode, "--model", model, "--r", str(args.r),
                   "--rows", str(args.rows), "--prompt", str(args.prompt), "--response",
                   str(args.response), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-4000:])
        print(done.stdout.strip().splitlines()[-1], flush=True)


def measure(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dgpo.logprobs import sequence_logprobs
    from dgpo.lora import LoraSettings, apply_lora, engine_weights
    from dgpo.losses import DGPOLoss
    from dgpo.optim import clip_grad_norm

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    model.config.use_cache = False
    if args.run == "lora":
        model = apply_lora(model, LoraSettings(r=args.r, alpha=2.0 * args.r))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    vocab = model.config.vocab_size
    width = args.prompt + args.response
    ids = torch.randint(10, vocab, (args.rows, width))
    attention = torch.ones_like(ids)
    mask = torch.zeros(args.rows, width - 1, dtype=torch.bool)
    mask[:, args.prompt - 1:] = True
    advantages = torch.randn(args.rows)
    loss_fn = DGPOLoss()
    seconds, cpu_seconds = [], []
    for step in range(1 + args.steps):
        begin, cpu_begin = time.perf_counter(), time.process_time()
        logp, _ = sequence_logprobs(model, ids, attention, mask)
        loss_fn(logp, logp.detach(), advantages, mask, num_tokens=mask.sum()).loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            seconds.append(time.perf_counter() - begin)
            cpu_seconds.append(time.process_time() - cpu_begin)
    record = {"mode": args.run, "rows": args.rows, "tokens": args.rows * width,
              "seconds_per_step": round(statistics.median(seconds), 3),
              # CPU time of all threads: comparable between runs on a shared, loaded machine
              "cpu_seconds_per_step": round(statistics.median(cpu_seconds), 3),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "trainable_params": sum(p.numel() for p in params),
              "total_params": sum(p.numel() for p in model.parameters())}
    if args.run == "lora":
        with torch.no_grad():  # make the adapters non-trivial, as after some training
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        record.update(sync_costs(model, engine_weights))
    return record


def sync_costs(model, engine_weights) -> dict:
    import torch

    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    times_ours, times_peft = [], []
    for _ in range(3):
        begin = time.perf_counter()
        for _name, tensor in engine_weights(model):
            tensor.sum()  # consume, as an engine's copy would
        times_ours.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        model.merge_adapter()
        for _name, tensor in model.state_dict().items():
            tensor.sum()
        model.unmerge_adapter()
        times_peft.append(time.perf_counter() - begin)
    after = model.state_dict()
    drift = max(float((after[k] - v).abs().max()) for k, v in before.items())
    bf16 = {k: v.to(torch.bfloat16) for k, v in before.items()}
    model.to(torch.bfloat16)
    model.merge_adapter()
    model.unmerge_adapter()
    after = model.state_dict()
    drift_bf16 = max(float((after[k].float() - v.float()).abs().max()) for k, v in bf16.items())
    return {"sync_s_merge_on_the_fly": round(statistics.median(times_ours), 3),
            "sync_s_peft_merge_unmerge": round(statistics.median(times_peft), 3),
            "peft_unmerge_drift_fp32": drift, "peft_unmerge_drift_bf16": drift_bf16}


if __name__ == "__main__":
    main()
