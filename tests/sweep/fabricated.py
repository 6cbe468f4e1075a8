"""Fabricated sweeps: run folders with run.json, status.json and a CSVLogger-shaped metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dgpo.sweep.plan import Run, write_run, write_sweep


def make_run(out: Path, method: str, seed: int) -> Run:
    run_dir = out.resolve() / "runs" / f"{method}-s{seed}"
    return Run(f"{method}-s{seed}", method, method, seed, (), str(run_dir),
               ("fit", "--model.loss", method, "--seed_everything", str(seed)))


def fabricate(out: Path, curves: dict[str, dict[int, list[float]]], wall: float = 60.0,
              extra: dict[str, list[float]] | None = None) -> list[Run]:
    """A finished sweep: ``curves[method][seed]`` is the reward per epoch of that run.

    metrics.csv is shaped as Lightning's CSVLogger writes it: a training row per epoch (reward,
    accuracy = reward / 2, entropy, LN, HP) and, for ``extra`` columns (validation), separate
    rows of the same epoch.
    """
    write_sweep(out, {"command": "python -m dgpo sweep --fabricated", "out": str(out.resolve()),
                      "config": "configs/tiny.yaml", "losses": list(curves), "seeds": [0, 1, 2],
                      "set": ["trainer.max_epochs=4"], "grid": [], "baseline": "grpo",
                      "ci": "t", "level": 0.95})
    runs = []
    for method, by_seed in curves.items():
        for seed, rewards in by_seed.items():
            run = make_run(out, method, seed)
            write_run(run)
            rows = [{"epoch": e, "step": 2 * e + 1, "rollout/reward_mean": r,
                     "rollout/reward/accuracy": r / 2, "train/entropy": 1.0 - 0.1 * e,
                     "rollout/response_length_mean": 10.0 + e, "train/region/LN": 0.01 * seed,
                     "train/region/HP": 0.02} for e, r in enumerate(rewards)]
            for name, values in (extra or {}).items():
                rows += [{"epoch": e, "step": 2 * e + 1, name: v} for e, v in enumerate(values)]
            pd.DataFrame(rows).to_csv(Path(run.run_dir) / "metrics.csv", index=False)
            (Path(run.run_dir) / "status.json").write_text(
                json.dumps({"state": "finished", "returncode": 0, "wall_seconds": wall}))
            runs.append(run)
    return runs
