"""Run several ``dgpo fit`` commands one after the other on every rank of one ``torchrun``.

The scale-out tests start one 2-rank launch per strategy and run the fits and resumes of all
its cases in it, to pay for the processes' start (imports, the process group) once::

    torchrun --nproc_per_node 2 tests/scale_out_runs.py plan.json

``plan.json`` is a list of argument lists for :func:`dgpo.cli.main`. Every call of
``AutoModelForCausalLM.from_pretrained`` (a read of the weights from disk) is recorded in
``weight_reads.jsonl`` beside it, with the rank and the calling file, so the tests can check
that under FSDP only rank 0 reads the policy.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `tests.plugins` is loaded by class_path

from dgpo.cli import main  # noqa: E402


def record_weight_reads(log: Path) -> None:
    """Append ``{"rank", "caller"}`` to ``log`` whenever a causal LM is read from disk."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        with log.open("a") as file:
            file.write(json.dumps({"rank": int(os.environ["RANK"]),
                                   "caller": str(caller.relative_to(REPO))
                                   if caller.is_relative_to(REPO) else str(caller)}) + "\n")
        return original(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


def free_port() -> int:
    """A free TCP port on this machine, for a launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_plan(base: Path, plan: list[list[str]], timeout: float) -> None:
    """Run ``plan``'s fits on 2 CPU ranks of one ``torchrun`` in ``base``.

    Writes ``base/plan.json`` and the launch's output to ``base/output.log``; fails the test
    with the output's tail when the launch exits non-zero.
    """
    (base / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(Path(__file__).resolve()),
               str(base / "plan.json")]
    result = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True,
                            timeout=timeout)
    (base / "output.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


if __name__ == "__main__":
    plan = Path(sys.argv[1])
    record_weight_reads(plan.parent / "weight_reads.jsonl")
    for args in json.loads(plan.read_text()):
        main(args)
