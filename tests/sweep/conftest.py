"""A stand-in for `python -m dgpo fit` that the sweep tests run instead of the real one."""

from __future__ import annotations

from pathlib import Path

import pytest

FAKE_FIT = """#!/bin/bash
# A stand-in for `python -m dgpo fit`: records its arguments, writes a checkpoint and metrics.
dir=""; prev=""
for a in "$@"; do [ "$prev" = "--trainer.default_root_dir" ] && dir="$a"; prev="$a"; done
echo "$*" >> "$dir/calls.txt"
echo "fit output of $dir"
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" > "$dir/env.txt"
mkdir -p "$dir/checkpoints"; touch "$dir/checkpoints/last.ckpt"
printf 'epoch,rollout/reward_mean\\n0,0.5\\n' > "$dir/metrics.csv"
if [ -n "$FAKE_FAIL" ] && [[ "$dir" == *"$FAKE_FAIL"* ]]; then exit 3; fi
# Lightning on SIGTERM: logs this line, stops after the epoch and exits with 0
if [ -n "$FAKE_SIGTERM" ]; then echo "[rank: 0] Received SIGTERM: 15"; fi
exit 0
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """An executable that stands in for the Python interpreter running ``-m dgpo fit``."""
    path = tmp_path / "fake_python"
    path.write_text(FAKE_FIT)
    path.chmod(0o755)
    return str(path)
