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
import datetime
import gc
import json
import platform
import socket
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning
import peft
import torch
import torch.distributed as dist
import transformers
from lightning.fabric.plugins.environments import LightningEnvironment
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecision
from transformers import AutoConfig, AutoModelForCausalLM

from dgpo.distributed import call_in_forward
from dgpo.logprobs import sequence_logprobs, token_logprobs
from dgpo.lora import LoraSettings, apply_lora
from dgpo.losses import DGPOLoss
from dgpo.optim import clip_grad_norm
from dgpo.rollout.engine import SamplingConfig
from dgpo.rollout.transformers_engine import TransformersEngine
from dgpo.strategies import CPUFSDPStrategy, FSDP2Strategy, _checkpoint_layers

CONFIG = Path(__file__).parent / "configs" / "r1-distill-qwen-1.5b.json"
LORA = LoraSettings(r=16, alpha=32.0, target_modules="all-linear")
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
              "bos_token_id": 1, "eos_token_id": 1}


@dataclass(frozen=True)
class Sizes:
    """What each section runs; :data:`PAPER` on a GPU, :data:`TINY` on CPU and in the tests."""

    micro_batch: int = 8
    prompt: int = 512
    response: int = 1024
    steps: int = 2  # timed training steps, after the warm-up steps
    warmup: int = 1
    logprob_tokens: int = 8 * 1024
    logprob_vocab: int = 151936
    gen_prompts: int = 8
    gen_n: int = 5
    gen_new_tokens: int = 1024
    share_layers: int = 2  # the sharing check uses the first layers of the model only
    share_groups: int = 2
    share_n: int = 4
    share_prompt: int = 128
    share_response: int = 256
    model: dict[str, int] = field(default_factory=dict)  # overrides of the model config


PAPER = Sizes()
TINY = Sizes(micro_batch=4, prompt=16, response=24, steps=1, warmup=0, logprob_tokens=64,
             logprob_vocab=4096, gen_prompts=2,
             gen_n=2, gen_new_tokens=6, share_groups=2, share_n=3, share_prompt=8,
             share_response=12, model=TINY_MODEL)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without CUDA)")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for the JSON and Markdown")
    parser.add_argument("--sections", nargs="+", default=["train", "logprobs", "generation",
                                                          "sharing"])
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
    sections: dict[str, Callable[[Sizes, torch.device], Any]] = {
        "train": check_training, "logprobs": check_logprobs, "generation": check_generation,
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


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name or platform.machine(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------- helpers
def build_model(sizes: Sizes, device: torch.device, dtype: torch.dtype,
                layers: int | None = None) -> torch.nn.Module:
    """The random model of :data:`CONFIG` (with the sizes' overrides) on ``device``."""
    values = {**json.loads(CONFIG.read_text()), **sizes.model}
    if layers is not None:
        values["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def grouped_batch(groups: int, n: int, prompt: int, response: int, vocab: int,
                  device: torch.device, ragged: bool = False) -> dict[str, torch.Tensor]:
    """``groups × n`` rows; the rows of a group share their prompt; right-padded when ragged."""
    generator = torch.Generator().manual_seed(0)
    rows, width = groups * n, prompt + response
    ids = torch.randint(10, vocab, (rows, width), generator=generator)
    for group in range(groups):
        ids[group * n:(group + 1) * n, :prompt] = ids[group * n, :prompt].clone()
    lengths = [response - (row * 3) % max(response // 2, 1) if ragged else response
               for row in range(rows)]
    attention = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    for row, length in enumerate(lengths):
        attention[row, :prompt + length] = 1
        mask[row, prompt - 1:prompt + length - 1] = True
    ids = ids.masked_fill(attention == 0, 0)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device),
            "response_mask": mask.to(device)}


def shard(model: torch.nn.Module, strategy: str, checkpointing: bool, device: torch.device,
          mixed: bool = True) -> torch.nn.Module:
    """``model`` sharded as dgpo's FSDP1 / FSDP2 strategies shard the policy (one rank)."""
    layer = type(model.get_decoder().layers[0])
    if strategy == "fsdp1":
        precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   buffer_dtype=torch.float32) if mixed else None
        fsdp1 = CPUFSDPStrategy(parallel_devices=[device],
                                cluster_environment=LightningEnvironment(),
                                auto_wrap_policy={layer}, mixed_precision=precision,
                                activation_checkpointing_policy={layer} if checkpointing else None)
        return fsdp1._setup_model(model)
    fsdp2 = FSDP2Strategy(layer_classes=[layer.__name__],
                          param_dtype="bfloat16" if mixed else None,
                          reduce_dtype="float32" if mixed else None,
                          activation_checkpointing=checkpointing)
    fsdp2._device_mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("data_parallel",))
    fsdp2._shard(model)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; returns the GiB allocated now (CUDA; 0 on CPU)."""
    synchronize(device)
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GiB since :func:`reset_peak` (None on CPU: not measured there)."""
    synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) \
        if device.type == "cuda" else None


def guarded(case: dict[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``case`` with ``run()``'s results, or with its error (the check goes on)."""
    try:
        case.update(run())
    except Exception as error:  # noqa: BLE001 - one failed case must not hide the others
        case["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        traceback.print_exc()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return case


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


# ------------------------------------------------------------------------------------ markdown
def to_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# dgpo GPU check — {env['device']}, {env['date_utc']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
             f"Lightning {env['lightning']}, peft {env['peft']}; {report['seconds_total']} s in "
             "all. Random weights, R1-Distill-Qwen-1.5B shape"
             + (" (tiny sizes)" if report["sizes"]["model"] else "") + ".", ""]
    tables = {
        "train": ("Training step (one micro-batch, fp32 weights)",
                  ["strategy", "mode", "checkpointing", "compute", "seconds", "peak_gib",
                   "tokens_per_s", "trainable_params", "grad_norm"]),
        "logprobs": ("Log-probs + entropy, forward + backward",
                     ["implementation", "tokens", "vocab", "seconds", "peak_gib",
                      "max_abs_diff_vs_naive"]),
        "generation": ("Transformers engine generation (temperature 1, top-p 1)",
                       ["rows", "prompt", "max_new_tokens", "dtype", "tokens", "seconds",
                        "tokens_per_s", "peak_gib"]),
        "sharing": ("Prompt sharing vs unshared (fp32)",
                    ["setup", "layers", "logp_max_abs_diff", "entropy_max_abs_diff",
                     "grad_max_rel_diff", "equal"])}
    for name, (title, columns) in tables.items():
        if name not in report:
            continue
        rows = report[name] if isinstance(report[name], list) else [report[name]]
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " | error |",
                  "|" + "---|" * (len(columns) + 1)]
        for row in rows:
            cells = ["" if row.get(c) is None else str(row.get(c)) for c in columns]
            note = row.get("error", row.get("skipped", ""))
            lines.append("| " + " | ".join(cells) + f" | {note} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
