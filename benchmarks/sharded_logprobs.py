"""Prompt sharing under FSDP: training log-probs (forward + backward) with and without it.

Each rank holds one micro-batch of ``--groups`` prompts × ``--n`` samples (prompt ``--prompt``
tokens, response ``--response`` tokens) and runs dgpo's log-prob path on its FSDP-sharded policy
— :func:`dgpo.distributed.call_in_forward` around :func:`dgpo.logprobs.sequence_logprobs`, as
``RLVRModule`` does — once with ``share_prompts`` (each distinct prompt through the decoder once,
its KV cache shared by the group's samples) and once without (the baseline), alternating, on
``--ranks`` CPU processes (gloo). The script starts them itself with torchrun.

    python benchmarks/sharded_logprobs.py                          # SmolLM2-135M, FSDP1 and FSDP2
    python benchmarks/sharded_logprobs.py --prompt 128 --response 256 --samples 5
    python benchmarks/sharded_logprobs.py --prompt 128 --response 512 --samples 5 --checkpointing
    python benchmarks/sharded_logprobs.py --strategies ddp     # unsharded, through DDP's forward

Last line per strategy: the median seconds of both and their ratio (baseline / shared).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--strategies", nargs="+", default=["fsdp1", "fsdp2"],
                        choices=["fsdp1", "fsdp2", "ddp"], help="ddp: the unsharded baseline")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2, help="distinct prompts per rank")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (n)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--response", type=int, default=256, help="response tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed, after one warm-up")
    parser.add_argument("--checkpointing", action="store_true",
                        help="checkpoint each decoder layer's activations (the paper configs)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        launch(args)
    else:
        from dgpo.distributed import release_process_group

        measure(args)
        release_process_group()  # the sharded model is gone: gloo's threads end here


def launch(args: argparse.Namespace) -> None:
    """Run this script on ``--ranks`` processes, one torchrun per strategy."""
    from dgpo.models import resolve_model

    model = resolve_model(args.model)  # built once here, not by every rank
    for strategy in args.strategies:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(args.ranks), "--master_port", str(port), __file__, "--model", model,
                   "--strategies", strategy, "--ranks", str(args.ranks), "--groups",
                   str(args.groups), "--samples", str(args.samples), "--prompt", str(args.prompt),
                   "--response", str(args.response), "--repeats", str(args.repeats),
                   *(["--checkpointing"] if args.checkpointing else [])]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stdout[-2000:] + done.stderr[-4000:])
        print([line for line in done.stdout.splitlines() if line.startswith("sharded")][-1],
              flush=True)


def measure(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dgpo.distributed import call_in_forward, call_through
    from dgpo.logprobs import sequence_logprobs
    from dgpo.strategies import _checkpoint_layers

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (strategy,) = args.strategies
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    model.config.use_cache = False
    layer = type(model.get_decoder().layers[0])
    vocab_size = model.config.vocab_size
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer}),
                                         device_id=torch.device("cpu"), use_orig_params=True)
        if args.checkpointing:  # after wrapping, as Lightning's activation_checkpointing_policy
            _checkpoint_layers(model, (layer,))
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if args.checkpointing:
            _checkpoint_layers(model, (layer,))
        model = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        if args.checkpointing:  # before sharding, as dgpo's FSDP2Strategy
            _checkpoint_layers(model, (layer,))
        for module in [m for m in model.modules() if isinstance(m, layer)]:
            fully_shard(module)
        fully_shard(model)

    generator = torch.Generator().manual_seed(rank)
    rows, width = args.groups * args.samples, args.prompt + args.response
    input_ids = torch.randint(10, vocab_size, (rows, width), generator=generator)
    for group in range(args.groups):  # the n samples of a prompt share it
        first = group * args.samples
        input_ids[first:first + args.samples, :args.prompt] = input_ids[first, :args.prompt]
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    response_mask[:, args.prompt - 1:] = True

    def step(share: bool) -> float:
        start = time.perf_counter()
        def logprobs(inner: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            return sequence_logprobs(inner, input_ids, attention_mask, response_mask,
                                     share_prompts=share, same_calls=True)

        if strategy == "ddp":  # inside DDP's forward, as Lightning calls training_step
            logp, entropy = call_through(model, model.module, lambda: logprobs(model.module))
        else:
            logp, entropy = call_in_forward(model, logprobs)
        (logp.sum() + entropy.sum()).backward()
        model.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats + 1):
        for share in (False, True):
            seconds = step(share)
            if repeat:  # the first round warms up
                times[share].append(seconds)
    if rank == 0:
        plain, shared = statistics.median(times[False]), statistics.median(times[True])
        checkpointing = ", checkpointing" if args.checkpointing else ""
        print(f"sharded_logprobs {strategy} x{args.ranks}: {args.groups}x{args.samples} rows of "
              f"{args.prompt}+{args.response} tokens{checkpointing}: plain {plain:.2f} s, shared "
              f"{shared:.2f} s, ratio {plain / shared:.2f}x", flush=True)


if __name__ == "__main__":
    main()
