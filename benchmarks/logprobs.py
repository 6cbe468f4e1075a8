"""Per-token log-prob + entropy from hidden states: dgpo's chunked path against the naive one.

The naive path is ``log_softmax((hidden @ head.T).float())`` with the entropy from the same
``(tokens, vocab)`` tensor, as most trainers compute it; dgpo's is
:func:`dgpo.logprobs.token_logprobs`. Each measurement (forward + backward of
``Σ logp·g1 + Σ entropy·g2`` for random upstream gradients) runs in a fresh process, the two
implementations alternating, so one cannot inherit the other's allocator state; the first pass in
each process is the warm-up and measures peak memory (above the inputs: peak RSS on CPU,
``max_memory_allocated`` on CUDA), the next ``--iters`` passes are timed.

    python benchmarks/logprobs.py                      # vocab 49k (h 576) and 151k (h 896)
    python benchmarks/logprobs.py --shapes 151936x1536x8192 --repeats 5

Last line: the median time and peak-memory ratios (dgpo / naive) at every shape.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

IMPLEMENTATIONS = ("naive", "dgpo")


def naive(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, targets[:, None]).squeeze(-1), entropy


def chunked(hidden, weight, targets, chunk_size):
    from dgpo.logprobs import token_logprobs

    return token_logprobs(hidden, weight, targets, chunk_size=chunk_size)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(impl: str, vocab: int, width: int, tokens: int, iters: int, chunk_size: int,
           device: str) -> dict:
    """One process: a warm-up pass that measures peak memory, then ``iters`` timed passes."""
    torch.manual_seed(0)
    hidden = torch.randn(tokens, width, device=device, requires_grad=True)
    weight = (torch.randn(vocab, width, device=device) / width**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    upstream = torch.randn(2, tokens, device=device)
    function = naive if impl == "naive" else lambda h, w, t: chunked(h, w, t, chunk_size)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_pass() -> tuple[float, float]:
        hidden.grad = weight.grad = None
        sync()
        start = time.perf_counter()
        logp, entropy = function(hidden, weight, targets)
        sync()
        middle = time.perf_counter()
        ((logp * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
        sync()
        return middle - start, time.perf_counter() - middle

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    one_pass()
    # the gradients of hidden and weight are outputs, not working memory: leave them out
    grads = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base - grads
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base - grads
    timings = [one_pass() for _ in range(iters)]
    return {"forward": statistics.median(t[0] for t in timings),
            "backward": statistics.median(t[1] for t in timings),
            "peak_bytes": max(peak, 0)}


def measure(impl: str, shape: tuple[int, int, int], args) -> dict | None:
    vocab, width, tokens = shape
    command = [sys.executable, __file__, "--worker", impl, "--shapes", f"{vocab}x{width}x{tokens}",
               "--iters", str(args.iters), "--chunk-size", str(args.chunk_size),
               "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:  # e.g. the naive path killed for memory
        print(f"  {impl} {shape}: failed (exit {result.returncode}) "
              f"{result.stderr.strip().splitlines()[-1:] if result.stderr else ''}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_shape(text: str) -> tuple[int, int, int]:
    vocab, width, tokens = (int(x) for x in text.lower().split("x"))
    return vocab, width, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[(49152, 576, 2048), (49152, 576, 8192),
                                 (151936, 896, 2048), (151936, 896, 8192)],
                        help="VOCABxHIDDENxTOKENS (default: SmolLM2 and Qwen2.5-0.5B heads)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per shape")
    parser.add_argument("--iters", type=int, default=1, help="timed passes per run")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(worker(args.worker, *args.shapes[0], args.iters, args.chunk_size,
                                args.device)))
        return

    print(f"device {args.device}, {torch.get_num_threads()} threads, chunk {args.chunk_size}, "
          f"{args.repeats} alternating runs; times are medians (s), memory peak above inputs")
    print("| vocab | hidden | tokens | naive fwd+bwd (s) | dgpo fwd+bwd (s) | time ratio "
          "| naive peak (GiB) | dgpo peak (GiB) | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for shape in args.shapes:
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLEMENTATIONS}
        for _ in range(args.repeats):
            for impl in IMPLEMENTATIONS:
                result = measure(impl, shape, args)
                if result is not None:
                    runs[impl].append(result)
        stats = {}
        for impl, results in runs.items():
            if results:
                stats[impl] = (statistics.median(r["forward"] + r["backward"] for r in results),
                               statistics.median(r["peak_bytes"] for r in results) / 2**30)
        naive_cells = ("failed", "failed") if "naive" not in stats else (
            f"{stats['naive'][0]:.2f}", f"{stats['naive'][1]:.2f}")
        dgpo_cells = ("failed", "failed") if "dgpo" not in stats else (
            f"{stats['dgpo'][0]:.2f}", f"{stats['dgpo'][1]:.2f}")
        if len(stats) == 2:
            time_ratio = stats["dgpo"][0] / stats["naive"][0]
            memory_ratio = stats["dgpo"][1] / max(stats["naive"][1], 1e-9)
            ratios = (f"{time_ratio:.2f}x", f"{memory_ratio:.1%}")
            summary.append(f"{shape[0]}x{shape[2]}: time {time_ratio:.2f}x, "
                           f"memory {memory_ratio:.1%}")
        else:
            ratios = ("-", "-")
            summary.append(f"{shape[0]}x{shape[2]}: naive failed")
        print(f"| {shape[0]} | {shape[1]} | {shape[2]} | {naive_cells[0]} | {dgpo_cells[0]} | "
              f"{ratios[0]} | {naive_cells[1]} | {dgpo_cells[1]} | {ratios[1]} |", flush=True)
    print("logprobs dgpo/naive: " + "; ".join(summary))


if __name__ == "__main__":
    main()
