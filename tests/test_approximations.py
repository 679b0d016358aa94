import numpy as np
import pytest
from scipy import stats

import dmft


def _problem(L, gamma0, n_steps=30):
    data = dmft.datasets.sphere(6, 8, 0, P_test=2)
    return dmft.Problem(data, dmft.MLP(L, "linear"), gamma0=gamma0, t_max=3.0, n_steps=n_steps)


@pytest.mark.parametrize("L", [1, 2, 3])
def test_perturbation_theory_error_is_order_gamma0_four(L):
    # The O(gamma0^2) term is exact for the discrete scheme and there are no odd orders, so the
    # remainder is O(gamma0^4): fitted slope 4 over gamma0 in [0.05, 0.4] (curvature from the
    # gamma0^6 term bends it by at most ~0.2 at the upper end). The lazy limit's error has slope 2.
    gammas = np.geomspace(0.05, 0.4, 5)
    err_pt, err_lazy = [], []
    for g in gammas:
        problem = _problem(L, g)
        exact = dmft.solve(problem, dmft.LinearClosure(rtol=1e-13, max_iters=400))
        pt = dmft.solve(problem, dmft.Perturbative())
        lazy = dmft.solve(problem, dmft.Lazy(discrete=True))
        err_pt.append(np.max(np.abs(exact.ntk - pt.ntk)))
        err_lazy.append(np.max(np.abs(exact.ntk - lazy.ntk)))
    slope = stats.linregress(np.log(gammas), np.log(err_pt)).slope
    print(f"L={L}: perturbation-theory NTK error slope {slope:.2f}")
    assert abs(slope - 4) < 0.25
    assert abs(stats.linregress(np.log(gammas), np.log(err_lazy)).slope - 2) < 0.2


def test_gradient_independence_exact_at_depth_one_and_worse_deeper():
    # Depth 1 has no response functions, so dropping them changes nothing (to round-off).
    p1 = _problem(1, 1.5)
    np.testing.assert_allclose(
        dmft.solve(p1, dmft.LinearClosure(responses=False)).loss, dmft.solve(p1, dmft.LinearClosure()).loss, atol=1e-12
    )
    errors = {}
    for L in (2, 3):
        for g in (0.5, 1.0):
            problem = _problem(L, g)
            full = dmft.solve(problem, dmft.LinearClosure())
            gia = dmft.solve(problem, dmft.LinearClosure(responses=False))
            errors[L, g] = float(np.max(np.abs(full.loss - gia.loss)))
    print("gradient independence max loss error:", errors)
    assert errors[3, 0.5] > errors[2, 0.5] and errors[3, 1.0] > errors[2, 1.0]  # grows with depth
    assert errors[2, 1.0] > errors[2, 0.5] and errors[3, 1.0] > errors[3, 0.5]  # grows with gamma0


def test_static_ntk_is_the_lazy_solution():
    problem = _problem(2, 1.0)
    np.testing.assert_array_equal(dmft.solve(problem, dmft.StaticNTK()).loss, dmft.solve(problem, dmft.Lazy()).loss)


def test_perturbative_rejects_nonlinear():
    data = dmft.datasets.sphere(4, 3, 0)
    with pytest.raises(ValueError, match="linear networks only"):
        dmft.solve(dmft.Problem(data, dmft.MLP(2, "tanh")), dmft.Perturbative())
