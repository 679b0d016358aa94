import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import dmft
from dmft import plotting

# One worker runs the whole module (pytest-xdist's `--dist loadfile`, pyproject.toml), so its module
# fixture (a compare and field samples) is computed once.


@pytest.fixture(scope="module")
def comparison():
    data = dmft.datasets.sphere(5, 4, 0)
    problem = dmft.Problem(data, dmft.MLP(2, "linear"), gamma0=1.0, t_max=3.0, n_steps=6)
    sol = dmft.solve(problem, dmft.LinearClosure())
    # A Solution is compared as it is; the fluctuation bands are drawn in test_cli (25 s less here).
    comp = dmft.compare(problem, sol, widths=[16, 64], seeds=2, fluctuations=False, progress=False)
    assert comp.dmft is sol
    return comp, data.y, dmft.field_samples(problem, comp.dmft, n_samples=2000, key=1)


def test_compare_refuses_a_solution_of_another_problem(comparison):
    comp = comparison[0]
    other = dmft.Problem(dmft.datasets.sphere(5, 4, 0), dmft.MLP(2, "linear"), gamma0=1.0, t_max=3.0, n_steps=8)
    with pytest.raises(ValueError, match="pass the Solution solved for this problem"):
        dmft.compare(other, comp.dmft, widths=[16], seeds=2, progress=False)


def test_comparison_figure_writes_png(comparison, tmp_path):
    comp, y, _ = comparison
    fig = plotting.comparison_figure(comp, y)
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert len(fig.axes) >= 4 and all(ax.get_xlabel() for ax in fig.axes[:3])


def test_comparison_figure_with_dmft_histograms(comparison):
    comp, y, samples = comparison
    fig = plotting.comparison_figure(comp, y, samples)
    hist_axes = [ax for ax in fig.axes if ax.get_xlabel() == r"preactivation $h$"]
    assert len(hist_axes) == 2 and all(len(ax.get_legend().get_texts()) == 2 for ax in hist_axes)
    assert [ax.get_title() for ax in hist_axes] == ["layer 1, point 0", "layer 2, point 0"]


def test_histogram_overlays_dmft_density_on_the_same_bins(comparison):
    comp, _, samples = comparison
    fig = plotting.preactivation_histogram(comp.runs[-1], samples=samples)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
    step = [p for p in ax.patches if type(p).__name__ == "Polygon"][0]
    edges = np.unique(np.round([b.get_x() for b in bars] + [bars[-1].get_x() + bars[-1].get_width()], 12))
    assert len(bars) == 60 and np.allclose(np.unique(np.round(step.get_xy()[:, 0], 12)), edges)
    # both are densities: each integrates to 1 over the bins
    assert np.isclose(sum(b.get_height() * b.get_width() for b in bars), 1.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["network, N = 64", "DMFT"]


def test_single_panels(comparison, tmp_path):
    comp, y, samples = comparison
    for fig in (
        plotting.loss_curves(comp),
        plotting.alignment_curves(comp, y),
        plotting.error_vs_width(comp),
        plotting.kernel_heatmap(comp.dmft.Phi_eq[-1, -1]),
        plotting.two_time_trace(comp.dmft),
        plotting.preactivation_histogram(comp.runs[-1]),
        plotting.preactivation_histogram(comp.runs[-1], layer=0, samples=samples.h),
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
