"""The tutorial notebooks are tests: their code cells assert what the text claims.

Default suite: every code cell in order, in this process, at the notebooks' small sizes
(DMFT_QUICK=1; the three heaviest with the slow suite). Slow suite: the notebooks as a user runs them
(a Jupyter kernel, full sizes)."""

import json
import os
import pathlib

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# The quickstart repeats the README's blocks (test_readme), the deep-linear notebook the `compare` of a
# linear closure against networks (test_plotting's fixture, the README's compare block), the digits
# notebook the classification `compare` of test_cli and the fluctuations notebook test_fluctuations'
# two-layer checks; at 0.5-1.5 min each they run with the slow suite, to keep the default under 12 min.
_HEAVY = {
    "01_quickstart.ipynb",
    "03_deep_linear.ipynb",
    "04_digits_classification.ipynb",
    "05_finite_width_fluctuations.ipynb",
}
QUICK = [pytest.param(p, marks=pytest.mark.slow) if p.name in _HEAVY else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", QUICK, ids=lambda p: p.name)
def test_notebook_cells_run_quick(path, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setenv("DMFT_QUICK", "1")
    monkeypatch.chdir(path.parent)
    matplotlib.use("Agg")
    namespace = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
    plt.close("all")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.delenv("DMFT_QUICK", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(path.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3").execute(cwd=str(path.parent))
