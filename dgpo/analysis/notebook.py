r"""Execute a notebook top to bottom with parameters (papermill-style), with nbclient.

The notebook's cell tagged ``parameters`` holds the defaults; the given parameters go into a new
cell right after it (tagged ``injected-parameters``), so they override the defaults. Run as a
script::

    python -m dgpo.analysis.notebook notebooks/figure4_gradient_weights.ipynb \\
        -p PRESET cpu -p EPOCHS 4 --inplace
"""

from __future__ import annotations

import argparse
import ast
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


def inject_parameters(notebook: Any, parameters: Mapping[str, Any]) -> Any:
    """Insert a cell assigning ``parameters`` after the cell tagged ``parameters``.

    Args:
        notebook: an ``nbformat`` notebook (modified in place and returned).
        parameters: names and values; each value is written with ``repr``.

    Raises:
        ValueError: when parameters are given and no cell is tagged ``parameters``.
    """
    import nbformat

    if not parameters:
        return notebook
    cells = notebook.cells
    tagged = [index for index, cell in enumerate(cells)
              if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise ValueError("the notebook has no cell tagged 'parameters' to override")
    source = "# Injected parameters\n" + "".join(f"{name} = {value!r}\n"
                                                 for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    cells.insert(tagged[0] + 1, cell)
    return notebook


def run_notebook(path: str | Path, parameters: Mapping[str, Any] | None = None,
                 output: str | Path | None = None, cwd: str | Path | None = None,
                 timeout: int = 1800, kernel_name: str = "python3") -> Any:
    """Execute a notebook with parameters and return the executed notebook.

    Args:
        path: the ``.ipynb`` file.
        parameters: overrides of the ``parameters`` cell (see :func:`inject_parameters`).
        output: where to save the executed notebook (``path`` itself to update it in place);
            ``None`` saves nothing.
        cwd: the kernel's working directory; defaults to the notebook's folder, so that its
            relative paths (``figures/``, ``runs/``) resolve next to it.
        timeout: seconds allowed per cell.
        kernel_name: the Jupyter kernel.

    Raises:
        nbclient.exceptions.CellExecutionError: when a cell fails (the message shows it).
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = inject_parameters(nbformat.read(path, as_version=4), parameters or {})
    client = NotebookClient(notebook, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(cwd or path.parent)}})
    client.execute()
    if output is not None:
        nbformat.write(notebook, output)
    return notebook


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: execute a notebook with ``-p NAME VALUE`` parameters."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="a Python literal (else a string)")
    parser.add_argument("--output", help="where to save the executed notebook")
    parser.add_argument("--inplace", action="store_true", help="save it over the input")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    parameters = {name: _value(value) for name, value in args.parameter}
    output = args.notebook if args.inplace else args.output
    start = time.perf_counter()
    run_notebook(args.notebook, parameters, output=output, timeout=args.timeout)
    print(f"executed {args.notebook} in {time.perf_counter() - start:.0f} s"
          + (f"; saved to {output}" if output else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
