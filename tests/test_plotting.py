import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import dmft
from dmft import plotting


@pytest.fixture(scope="module")
def comparison():
    data = dmft.datasets.sphere(5, 4, 0)
    problem = dmft.Problem(data, dmft.MLP(2, "linear"), gamma0=1.0, t_max=3.0, n_steps=6)
    return dmft.compare(problem, dmft.LinearClosure(), widths=[16, 64], seeds=2, progress=False), data.y


def test_comparison_figure_writes_png(comparison, tmp_path):
    comp, y = comparison
    fig = plotting.comparison_figure(comp, y)
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert len(fig.axes) >= 4 and all(ax.get_xlabel() for ax in fig.axes[:3])


def test_single_panels(comparison, tmp_path):
    comp, y = comparison
    for fig in (
        plotting.loss_curves(comp),
        plotting.alignment_curves(comp, y),
        plotting.error_vs_width(comp),
        plotting.kernel_heatmap(comp.dmft.Phi_eq[-1, -1]),
        plotting.two_time_trace(comp.dmft),
        plotting.preactivation_histogram(comp.runs[-1]),
    ):
        fig.savefig(tmp_path / "p.png")


def test_target_alignment_of_y_y_transpose_is_one():
    y = np.array([1.0, -1.0, 2.0])
    assert np.isclose(plotting.target_alignment(np.outer(y, y), y), 1.0)


def test_two_time_trace_needs_two_time_kernels(comparison):
    with pytest.raises(ValueError, match="no two-time kernels"):
        plotting.two_time_trace(comparison[0].lazy)


def test_importing_dmft_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, dmft; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
