"""Run several ``dgpo fit`` commands one after the other on every rank of one ``torchrun``.

The scale-out tests start one 2-rank launch per strategy and run the fits and resumes of all
its cases in it, to pay for the processes' start (imports, the process group) once::

    torchrun --nproc_per_node 2 tests/scale_out_runs.py plan.json

``plan.json`` is a list of argument lists for :func:`dgpo.cli.main`.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `tests.plugins` is loaded by class_path

from dgpo.cli import main  # noqa: E402

if __name__ == "__main__":
    for args in json.loads(Path(sys.argv[1]).read_text()):
        main(args)
