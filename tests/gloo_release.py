"""Gloo's threads on each rank around :func:`dgpo.distributed.release_process_group`.

    torchrun --nproc_per_node 2 tests/gloo_release.py out.json

One FSDP1 step of a small model on CPU (gloo), then the model is dropped, and the number of the
process's threads is read from ``/proc/self/task`` at each stage: before the process group,
while it works, after ``del model`` (a reference cycle keeps the model, and with it the process
group and its threads, alive) and after ``release_process_group()``. Each rank writes
``out.json.rank<r>``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dgpo.distributed import release_process_group  # noqa: E402


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


if __name__ == "__main__":
    counts = {"start": threads()}
    dist.init_process_group("gloo")
    model = FullyShardedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)),
        device_id=torch.device("cpu"), use_orig_params=True)
    model(torch.randn(4, 8)).sum().backward()
    dist.barrier()
    counts["working"] = threads()
    del model
    counts["dropped"] = threads()
    release_process_group()
    counts["released"] = threads()
    counts["initialized"] = dist.is_initialized()
    Path(f"{sys.argv[1]}.rank{os.environ['RANK']}").write_text(json.dumps(counts))
