"""Every notebook executes top to bottom with small parameters, and draws the PNGs it promises."""

from pathlib import Path

import nbformat
import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run_notebook(name: str, parameters: dict) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>`` with papermill in its own folder (as ``papermill`` does)."""
    return papermill.execute_notebook(NOTEBOOKS / name, None, parameters=parameters,
                                      cwd=NOTEBOOKS, kernel_name="python3", progress_bar=False)


def test_notebook_figure2_weight_functions(tmp_path, nonblank_png):
    run_notebook("figure2_weight_functions.ipynb", {"FIGURE_DIR": str(tmp_path)})
    nonblank_png(tmp_path / "figure2.png")


@pytest.fixture(scope="module")
def figure4_notebook(tmp_path_factory):
    """Run the Figure 4 notebook once with the tiny preset: its runs and figures."""
    root = tmp_path_factory.mktemp("figure4")
    notebook = run_notebook("figure4_gradient_weights.ipynb",
                            {"PRESET": "tiny", "RUN_ROOT": str(root / "runs"),
                             "FIGURE_DIR": str(root / "figures"), "MAX_POINTS": 2000})
    return root, notebook


def test_notebook_figure4_trains_three_runs_and_draws_abc(figure4_notebook, nonblank_png):
    root, notebook = figure4_notebook
    for method in ("grpo", "gppo", "dgpo"):
        assert (root / "runs" / method / "version_0" / "gradient_weights.parquet").is_file()
    for panel in "abc":
        nonblank_png(root / "figures" / f"figure4{panel}.png")
    outputs = "".join(str(output.get("data", {}).get("text/html", ""))
                      for cell in notebook.cells for output in cell.get("outputs", []))
    assert "LN" in outputs and "HP" in outputs  # the region table was shown


def test_notebook_figure3_training_dynamics(figure4_notebook, tmp_path, nonblank_png):
    root, _ = figure4_notebook
    runs = [str(root / "runs" / method / "version_0") for method in ("grpo", "gppo", "dgpo")]
    run_notebook("figure3_training_dynamics.ipynb", {"RUN_DIRS": runs, "FIGURE_DIR": str(tmp_path)})
    nonblank_png(tmp_path / "figure3.png")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_parameters_cell_is_tagged_for_papermill(path):
    notebook = papermill.iorw.load_notebook_node(str(path))
    tagged = [index for index, cell in enumerate(notebook.cells)
              if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "papermill overrides the one cell tagged 'parameters'"
    parameterized = papermill.parameterize.parameterize_notebook(notebook, {"FIGURE_DIR": "/x"})
    injected = parameterized.cells[tagged[0] + 1]
    assert "injected-parameters" in injected.metadata.tags
    assert "FIGURE_DIR = \"/x\"" in injected.source
