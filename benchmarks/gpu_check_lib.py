"""Sizes, model building, sharding, measuring and the Markdown report of ``gpu_check.py``."""

from __future__ import annotations

import datetime
import gc
import json
import platform
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import peft
import torch
import transformers
from lightning.fabric.plugins.environments import LightningEnvironment
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecision
from transformers import AutoConfig, AutoModelForCausalLM

from dgpo.lora import LoraSettings
from dgpo.strategies import CPUFSDPStrategy, FSDP2Strategy

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
        "lora_sync": ("Sharded LoRA policy (fp32, checkpointing): engine weights, reference",
                      ["strategy", "tensors", "same_names", "max_abs_diff", "seconds",
                       "reference_max_abs_diff", "grad_norm_after"]),
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
