import equinox as eqx
import jax.random as jr
import numpy as np
import pytest

import dmft


def _data():
    return dmft.datasets.sphere(4, 3, 0, P_test=1)


def _max_z(samples, K, var, slack=0.0):
    """Largest `(|mean_s x_mu x_nu - K_mu nu| - slack) / sqrt(var)` over entries (mu, nu).

    The estimator `mean_s x_mu x_nu` of `K_{mu nu}` from S independent samples has variance
    `Var(x_mu x_nu) / S`; for Gaussian fields `Var(x_mu x_nu) = K_mu mu K_nu nu + K_mu nu^2`. A bound of
    5 standard errors per entry fails by chance with probability 6e-7 per entry (a few 1e-5 over the
    <= 75 entries a test checks).
    """
    return np.max((np.abs(samples.T @ samples / samples.shape[0] - K) - slack) / np.sqrt(var))


def _gaussian_var(K, S):
    return (np.outer(np.diag(K), np.diag(K)) + K**2) / S


@pytest.mark.parametrize("depth", [1, 3])
def test_linear_samples_have_the_closure_kernels(depth):
    # Linear network: h^l, g^l are exactly Gaussian with covariances Phi^l(t,t), G^l(t,t), and the
    # closure is converged to rtol = 1e-10, so only the sampling error of the S samples remains.
    problem = dmft.Problem(_data(), dmft.MLP(depth, "linear"), gamma0=1.0, t_max=3.0, n_steps=5)
    sol = dmft.solve(problem, dmft.LinearClosure())
    S = 20_000
    fs = dmft.field_samples(problem, sol, n_samples=S, key=1, time=-1)
    assert fs.h.shape == fs.z.shape == fs.g.shape == (depth, S, 5)
    for l in range(depth):
        Phi, G = np.asarray(sol.Phi_eq[l, -1]), np.asarray(sol.G_eq[l, -1])
        assert _max_z(np.asarray(fs.h[l]), Phi, _gaussian_var(Phi, S)) < 5, l
        assert _max_z(np.asarray(fs.g[l]), G, _gaussian_var(G, S)) < 5, l


@pytest.mark.slow
def test_relu_samples_have_the_monte_carlo_kernels():
    problem = dmft.Problem(_data(), dmft.MLP(2, "relu"), gamma0=1.0, t_max=3.0, n_steps=5)
    solver = dmft.MonteCarlo(n_samples=4096, chunk_size=2048)
    sol = dmft.solve(problem, solver, key=0)
    S = 2**14
    fs = dmft.field_samples(problem, sol, n_samples=S, key=1, time=-1)
    # sample covariance - sol.Phi_eq = (sampling error of the S samples at the order parameters x of
    # sol) + (T(x) - x, the solver's own sampling error at x: variance Var / n_samples over the
    # pooled samples) + (x - T(x), the pooled stage stops at its noise floor, not at T's fixed point).
    # The last term is computed exactly by applying the solver's pooled map (same key) to x.
    x = solver.init(problem, jr.key(0)).q
    x = eqx.tree_at(lambda s: (s.Phi, s.G, s.A, s.B), x, (sol.Phi, sol.G, sol.A, sol.B))
    Tx = solver._map(problem, x, solver._keys(jr.key(0)), solver._axes(problem), None, solver._beta(problem))[0]
    for l in range(2):
        phi = np.maximum(np.asarray(fs.h[l]), 0.0)
        prod_var = (phi[:, :, None] * phi[:, None, :]).var(0)  # Var(phi_mu phi_nu), not Gaussian
        gap = np.abs(np.asarray(dmft.dynamics.equal_time(Tx.Phi)[l, -1] - sol.Phi_eq[l, -1]))
        z = _max_z(phi, np.asarray(sol.Phi_eq[l, -1]), prod_var / S + prod_var / solver.n_samples, gap)
        assert z < 5, (l, z)


def test_deep_samples_need_two_time_kernels():
    problem = dmft.Problem(_data(), dmft.MLP(2, "relu"), gamma0=1.0, t_max=3.0, n_steps=5)
    with pytest.raises(ValueError, match="two-time kernels"):
        dmft.field_samples(problem, dmft.solve(problem, dmft.Lazy()), n_samples=8, key=0)


def test_samples_check_problem_and_time():
    problem = dmft.Problem(_data(), dmft.MLP(1, "relu"), gamma0=1.0, t_max=3.0, n_steps=5)
    other = dmft.Problem(_data(), dmft.MLP(1, "relu"), gamma0=1.0, t_max=3.0, n_steps=4)
    sol = dmft.solve(problem, dmft.Lazy())
    with pytest.raises(ValueError, match="Problem the Solution was solved for"):
        dmft.field_samples(other, sol, n_samples=8, key=0)
    with pytest.raises(ValueError, match="time must be an index"):
        dmft.field_samples(problem, sol, n_samples=8, key=0, time=6)
