import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg
from quadrature import kernel_matrix
from scipy import special

import dmft
from dmft.solvers.lazy import gradient_flow_predictions, lazy_kernels

SCALAR = {
    "linear": (lambda x: x, lambda x: 1.0, ()),
    "relu": (lambda x: max(x, 0.0), lambda x: 1.0 if x > 0 else 0.0, (0.0,)),
    "erf": (special.erf, lambda x: 2 / np.sqrt(np.pi) * np.exp(-x * x), ()),
}


def _data(P=3, D=4, P_test=0, seed=0):
    # Inputs of unequal norms so that the diagonal of every kernel varies.
    X = np.asarray(jr.normal(jr.key(seed), (P + P_test, D))) * np.linspace(0.7, 1.4, P + P_test)[:, None]
    y = np.asarray(jr.normal(jr.key(seed + 1), (P + P_test,)))
    if P_test:
        return dmft.Dataset(X[:P], y[:P], X[P:], y[P:])
    return dmft.Dataset(X, y)


@pytest.mark.parametrize("name", ["linear", "relu", "erf"])
def test_nngp_ntk_recursion_matches_quadrature(name):
    # Independent evaluation: the recursion of THEORY section 8 with every Gaussian expectation done
    # by scipy adaptive quadrature (tests/quadrature.py, accurate to ~1e-12); closed forms must agree
    # to 1e-8 at every depth 1..4.
    fn, dfn, kinks = SCALAR[name]
    data = _data()
    prev, Phi_ref, Gdot_ref = np.asarray(data.Kx), [], []
    for _ in range(4):
        Phi_ref.append(kernel_matrix(fn, fn, prev, kinks))
        Gdot_ref.append(kernel_matrix(dfn, dfn, prev, kinks))
        prev = Phi_ref[-1]
    for L in range(1, 5):
        Phi, G, K = lazy_kernels(dmft.Problem(data, dmft.MLP(L, name)))
        G_ref = [np.prod(Gdot_ref[l:L], axis=0) for l in range(L)]
        K_ref = G_ref[0] * np.asarray(data.Kx) + sum(G_ref[l] * Phi_ref[l - 1] for l in range(1, L)) + Phi_ref[L - 1]
        np.testing.assert_allclose(Phi, np.stack(Phi_ref[:L]), atol=1e-8)
        np.testing.assert_allclose(G, np.stack(G_ref), atol=1e-8)
        np.testing.assert_allclose(K, K_ref, atol=1e-8)


def test_deep_linear_ntk_is_depth_plus_one_times_input_kernel():
    data = _data(P=5, D=3, P_test=2)
    for L in (1, 3):
        _, _, K = lazy_kernels(dmft.Problem(data, dmft.MLP(L, "linear")))
        np.testing.assert_allclose(K, (L + 1) * data.Kx, rtol=1e-12)


def test_predictions_match_matrix_exponential():
    # d/dt [f; f_test] = (eta0/P) [K_tr; K_te] (y - f): an affine linear ODE, integrated exactly by
    # the exponential of the augmented matrix [[M, c], [0, 0]] (scipy.linalg.expm, float64).
    data = _data(P=6, D=3, P_test=3)
    problem = dmft.Problem(data, dmft.MLP(2, "relu"), t_max=7.0, n_steps=9, eta0=1.3)
    sol = dmft.solve(problem, dmft.Lazy())
    _, _, K = lazy_kernels(problem)
    K, y, P, Pa = np.asarray(K), np.asarray(data.y), 6, 9
    rate = 1.3 / P
    M = np.zeros((Pa + 1, Pa + 1))
    M[:Pa, :P] = -rate * K[:, :P]
    M[:Pa, Pa] = rate * K[:, :P] @ y
    ref = np.stack([scipy.linalg.expm(M * t)[:Pa, Pa] for t in np.asarray(problem.ts)])
    np.testing.assert_allclose(sol.f, ref[:, :P], rtol=0, atol=1e-10)
    np.testing.assert_allclose(sol.f_test, ref[:, P:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(sol.loss, 0.5 * np.mean((ref[:, :P] - y) ** 2, axis=1), atol=1e-10)


def test_predictions_with_singular_kernel():
    # More points than input dimensions with a linear net: K = 2 Kx has rank D < P. The component of
    # y in the null space never trains, and test predictions stay finite.
    data = _data(P=6, D=2, P_test=2)
    problem = dmft.Problem(data, dmft.MLP(1, "linear"), t_max=50.0, n_steps=5)
    sol = dmft.solve(problem, dmft.Lazy())
    K = 2 * np.asarray(data.Kx)[:6, :6]
    lam, V = np.linalg.eigh(K)
    null = V[:, lam < 1e-10 * lam.max()]
    resid = np.asarray(data.y) - np.asarray(sol.f[-1])
    np.testing.assert_allclose(null.T @ resid, null.T @ np.asarray(data.y), atol=1e-10)
    assert np.all(np.isfinite(sol.f_test))


def test_discrete_lazy_is_euler_power():
    data = _data(P=4, D=3)
    problem = dmft.Problem(data, dmft.MLP(2, "erf"), t_max=3.0, n_steps=6)
    sol = dmft.solve(problem, dmft.Lazy(discrete=True))
    _, _, K = lazy_kernels(problem)
    step = np.eye(4) - problem.dt * np.asarray(K) / 4
    Delta = np.stack([np.linalg.matrix_power(step, k) @ np.asarray(data.y) for k in range(7)])
    np.testing.assert_allclose(sol.f, np.asarray(data.y) - Delta, atol=1e-12)


def test_solution_contract():
    data = _data(P=5, D=3, P_test=2)
    problem = dmft.Problem(data, dmft.MLP(3, "relu"), n_steps=8)
    sol = dmft.solve(problem, dmft.Lazy())
    assert sol.ts.shape == (9,) and sol.ts[0] == 0 and np.isclose(sol.ts[-1], problem.t_max)
    assert sol.f.shape == (9, 5) and sol.loss.shape == (9,) and sol.ntk.shape == (9, 5, 5)
    assert sol.f_test.shape == (9, 2) and sol.ntk_test.shape == (9, 2, 5) and sol.loss_test.shape == (9,)
    assert sol.Phi_eq.shape == sol.G_eq.shape == (3, 9, 7, 7)
    assert sol.Phi is None and sol.iterations == 0 and sol.result == dmft.RESULTS.successful
    np.testing.assert_allclose(sol.loss[0], 0.5 * np.mean(np.asarray(data.y) ** 2))
    assert np.all(np.diff(sol.loss) <= 1e-15)  # gradient flow on MSE never increases the loss
    no_test = dmft.solve(dmft.Problem(_data(P=5, D=3), dmft.MLP(1, "relu"), n_steps=8), dmft.Lazy())
    assert no_test.f_test is None and no_test.ntk_test is None and no_test.loss_test is None


def test_gradient_flow_predictions_at_time_zero():
    K = jnp.eye(3) * 2.0
    f = gradient_flow_predictions(K, jnp.ones(3), jnp.array([0.0, 1.0]), 1.0)
    np.testing.assert_allclose(f[0], 0.0)
    np.testing.assert_allclose(f[1], 1 - np.exp(-2 / 3))


def _nt_closed_forms(name, cov):
    """`(E[phi phi], E[phi' phi'])` as neural-tangents' stax.Relu / stax.Erf evaluate them (arc-cosine
    kernels, Williams 1997), in NumPy."""
    d = np.diag(cov)
    if name == "relu":
        norm = np.sqrt(np.outer(d, d))
        theta = np.arccos(np.clip(cov / norm, -1.0, 1.0))
        return norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi), (np.pi - theta) / (2 * np.pi)
    prod = np.outer(1 + 2 * d, 1 + 2 * d)
    return 2 / np.pi * np.arcsin(2 * cov / np.sqrt(prod)), 4 / np.pi / np.sqrt(prod - 4 * cov**2)


@pytest.mark.parametrize("name", ["relu", "erf"])
def test_weight_and_bias_variances_match_neural_tangents_recursion(name):
    # neural-tangents' stax.serial(Dense(W_std, b_std), act, ..., Dense(W_std, b_std)) kernels in its
    # own recursion form (THEORY 11): nngp^1 = W_std^2 Kx + b_std^2, Theta^1 = nngp^1, then per layer
    # nngp' = W_std^2 E[phi phi] + b_std^2, Theta' = nngp' + W_std^2 E[phi' phi'] Theta, with the
    # closed forms in NumPy (tabulated values of neural-tangents' formulas; the closed forms themselves
    # are checked against quadrature above, which loses accuracy at the near-1 correlations that
    # biases produce in deep layers). The library's G-product form must agree to 1e-8 at depths 1-4.
    data = _data()
    sw, sb = 1.4, 0.6
    nngp = sw**2 * np.asarray(data.Kx) + sb**2
    theta = nngp
    for L in range(1, 5):
        phi, dphi = _nt_closed_forms(name, nngp)
        nngp = sw**2 * phi + sb**2
        theta = nngp + sw**2 * dphi * theta
        _, _, K = lazy_kernels(dmft.Problem(data, dmft.MLP(L, name, sigma_w=sw, sigma_b=sb)))
        np.testing.assert_allclose(K, theta, atol=1e-8, rtol=0)
