import numpy as np
import pytest
from scipy import stats

import dmft


def _problem(L, gamma0, n_steps=30, sigmas=(1.0, 0.0)):
    data = dmft.datasets.sphere(6, 8, 0, P_test=2)
    net = dmft.MLP(L, "linear", sigma_w=sigmas[0], sigma_b=sigmas[1])
    return dmft.Problem(data, net, gamma0=gamma0, t_max=3.0, n_steps=n_steps)


@pytest.mark.parametrize(
    "L, sigmas",
    [(1, (1.0, 0.0)), (2, (1.0, 0.0)), (2, (0.9, 0.4)), pytest.param(3, (1.0, 0.0), marks=pytest.mark.slow)],
)
def test_perturbation_theory_error_is_order_gamma0_four(L, sigmas):
    # The O(gamma0^2) term is exact for the discrete scheme and there are no odd orders, so the
    # remainder is O(gamma0^4): fitted slope 4 over gamma0 in [0.05, 0.4] (curvature from the
    # gamma0^6 term bends it by at most ~0.2 at the upper end). The lazy limit's error has slope 2.
    gammas = np.geomspace(0.05, 0.4, 5)
    err_pt, err_lazy = [], []
    for g in gammas:
        problem = _problem(L, g, sigmas=sigmas)
        exact = dmft.solve(problem, dmft.LinearClosure(rtol=1e-13, max_iters=400))
        pt = dmft.solve(problem, dmft.Perturbative())
        lazy = dmft.solve(problem, dmft.Lazy(discrete=True))
        err_pt.append(np.max(np.abs(exact.ntk - pt.ntk)))
        err_lazy.append(np.max(np.abs(exact.ntk - lazy.ntk)))
    slope = stats.linregress(np.log(gammas), np.log(err_pt)).slope
    print(f"L={L}: perturbation-theory NTK error slope {slope:.2f}")
    assert abs(slope - 4) < 0.25
    assert abs(stats.linregress(np.log(gammas), np.log(err_lazy)).slope - 2) < 0.2


@pytest.mark.slow
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


# ---- smooth nonlinear two-layer networks ---------------------------------------------------------


def _small_data(C=1):
    """4 + 1 points in 3 dimensions with scalar targets, or C normal targets per point."""
    data = dmft.datasets.sphere(4, 3, 0, P_test=1)
    if C == 1:
        return data
    Y = np.random.default_rng(0).normal(size=(5, C))
    return dmft.Dataset(data.X, Y[:4], data.X_test, Y[4:])


def _two_layer(activation, gamma0=1.0, sigmas=(1.0, 0.0), C=1):
    data = _small_data(C)
    net = dmft.MLP(1, activation, sigma_w=sigmas[0], sigma_b=sigmas[1])
    return dmft.Problem(data, net, gamma0=gamma0, t_max=3.0, n_steps=10)


def _with_gamma0(problem, g):
    import equinox as eqx

    return eqx.tree_at(lambda p: p.gamma0, problem, g)


def _K2(problem, sol):
    """The O(gamma0^2) NTK coefficient of a Perturbative solution (its kernels are x0 + gamma0^2 x2)."""
    lazy = dmft.solve(problem, dmft.Lazy(discrete=True))
    return np.asarray(sol.ntk - lazy.ntk) / float(problem.gamma0) ** 2, np.asarray(sol.stderr["ntk"]) / float(
        problem.gamma0
    ) ** 2


def _z(K2, se, samples, slack):
    """Deviation of the sampled K2(t_max) from the mean of independent `samples` (keys or seeds) in
    units of the combined standard error (spread of the samples and K2.s replicas), after
    subtracting the truncation `slack`."""
    se_total = np.sqrt(samples.var(0, ddof=1) / len(samples) + se[-1] ** 2)
    return (np.abs(K2[-1] - samples.mean(0)) - slack) / se_total, se_total


# The weight and bias variances with one output and with three share their code path; the
# (0.9, 0.4), C = 1 case was dropped from the default suite to keep it under 12 minutes.
@pytest.mark.parametrize("sigmas, C", [((1.0, 0.0), 1), ((0.9, 0.4), 3)])
def test_nonlinear_path_on_the_identity_matches_the_linear_closure(sigmas, C):
    # The identity as a generic smooth activation runs the nonlinear two-layer path (forward-mode
    # second derivative of the sampled single site); the exact closure's finite difference
    # (K(eps) - K(0)) / eps^2 = K2 + eps^2 K4 + ... gives K2 without sampling. Tolerance: 5 replica
    # standard errors of the sampled K2 plus the eps^2 K4 truncation, estimated by Richardson from
    # eps and 2 eps (difference = 3 eps^2 K4), doubled. C = 3 outputs: the read-outs r are sampled with u
    # (no Gauss-Hermite rule), the class-resolved NTK entries are all tested.
    problem = _two_layer(dmft.activations.Elementwise(lambda h: h, label="identity"), sigmas=sigmas, C=C)
    K2, se = _K2(problem, dmft.solve(problem, dmft.Perturbative(n_samples=8192), key=0))
    linear = _two_layer("linear", sigmas=sigmas, C=C)
    K0 = np.asarray(dmft.solve(linear, dmft.Lazy(discrete=True)).ntk)
    closure = dmft.LinearClosure(rtol=1e-13, max_iters=400)
    fd = lambda e: (np.asarray(dmft.solve(_with_gamma0(linear, e), closure).ntk) - K0) / e**2
    eps = 0.02
    exact, truncation = fd(eps), 2 * np.abs(fd(2 * eps) - fd(eps)) / 3
    z = (np.abs(K2 - exact) - truncation)[1:] / se[1:]  # t = 0: K2 = 0 exactly, se = 0
    print(
        f"identity: max |K2| {np.abs(exact).max():.3f}, max error {np.abs(K2 - exact).max():.2e}, max z {z.max():.2f}"
    )
    assert z.max() < 5


@pytest.mark.slow
def test_tanh_two_layer_matches_a_finite_difference_of_monte_carlo():
    # With common random numbers (same key) the second difference [K(2 eps) - 2 K(eps) + K(0)] / (2 eps^2)
    # of MonteCarlo solves is that solver's own sampled K2 plus 3 eps K3 (K3, odd in gamma0, is zero in
    # expectation but not sample by sample) + O(eps^2). Its sampling error is estimated from the spread
    # over 8 keys (t distribution with 7 degrees of freedom: |t| > 7 has probability 2e-4 per entry; 10
    # distinct entries of K2(t_max) are tested), combined with Perturbative's replica standard error;
    # the truncation 3 eps K3 is estimated by fd(2 eps) - fd(eps) = 3 eps K3 + O(eps^2) and added as slack.
    problem = _two_layer("tanh")
    K2, se = _K2(problem, dmft.solve(problem, dmft.Perturbative(n_samples=8192), key=0))
    mc = dmft.MonteCarlo(n_samples=8192, chunk_size=1024, damping=1.0, rtol=1e-13, max_iters=50)
    K = lambda g, k: np.asarray(dmft.solve(_with_gamma0(problem, g), mc, key=k).ntk[-1])
    fd = lambda e, k: (K(2 * e, k) - 2 * K(e, k) + K(0.0, k)) / (2 * e**2)
    eps = 0.05
    fds = np.array([fd(eps, k) for k in range(8)])
    truncation = np.abs(fd(2 * eps, 0) - fds[0])
    z, se_total = _z(K2, se, fds, truncation)
    print(
        f"tanh: max |K2(t_max)| {np.abs(K2[-1]).max():.3f}, max error {np.abs(K2[-1] - fds.mean(0)).max():.2e}, "
        f"max se {se_total.max():.1e}, max z {z.max():.2f}"
    )
    assert z.max() < 7


def test_perturbative_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="second and third derivatives"):
        dmft.solve(_two_layer("relu"), dmft.Perturbative(), key=0)
    deep = dmft.Problem(dmft.datasets.sphere(4, 3, 0), dmft.MLP(2, "relu"), gamma0=0.5, t_max=1.0, n_steps=4)
    with pytest.raises(ValueError, match="second and third derivatives"):
        dmft.solve(deep, dmft.Perturbative(), key=0)
    with pytest.raises(ValueError, match="pass key"):
        dmft.solve(_two_layer("tanh"), dmft.Perturbative())
    with pytest.raises(ValueError, match="n_replicas must be >= 2 and divide n_samples"):
        dmft.solve(_two_layer("tanh"), dmft.Perturbative(n_samples=1001), key=0)


# ---- smooth nonlinear deep networks ---------------------------------------------------------------


def _small_gamma(problem, g=1e-3):
    """The problem at a gamma0 so small that `(ntk - ntk_lazy) / gamma0^2` is the O(gamma0^2)
    coefficient K2 of a Perturbative solution to ~1e-6: its kernels are x0 + gamma0^2 x2, but the NTK
    is bilinear in them at depth >= 2 (`G^2 * Phi^1`), so at gamma0 = 1 it would carry x2 * x2."""
    return _with_gamma0(problem, g)


@pytest.mark.slow
@pytest.mark.parametrize(
    "L, sigmas, C", [(2, (1.0, 0.0), 1), (3, (1.0, 0.0), 1), (2, (0.9, 0.4), 1), (2, (0.9, 0.4), 3)]
)
def test_deep_nonlinear_path_on_the_identity_matches_the_linear_closure(L, sigmas, C):
    # The identity as a generic smooth activation runs the deep nonlinear path: lazy responses, field
    # terms through the sampled single site, source shifts propagated across layers. The closure's
    # (K(eps) - K(0)) / eps^2 = K2 + eps^2 K4 gives K2 exactly (Richardson slack as above). Tolerance:
    # 5.5 standard errors over 16 replicas (t with 15 degrees of freedom: P(|t| > 5.5)
    # = 7e-5 per entry, < 1% over the ~100 distinct entries tested; C = 3: ~900 entries, P ~6%).
    data = _small_data(C)
    ident = dmft.activations.Elementwise(lambda h: h, label="identity")
    mlp = lambda act: dmft.MLP(L, act, sigma_w=sigmas[0], sigma_b=sigmas[1])
    problem = _small_gamma(dmft.Problem(data, mlp(ident), gamma0=1.0, t_max=3.0, n_steps=10))
    K2, se = _K2(problem, dmft.solve(problem, dmft.Perturbative(n_samples=32768, n_replicas=16), key=0))
    linear = dmft.Problem(data, mlp("linear"), gamma0=1.0, t_max=3.0, n_steps=10)
    K0 = np.asarray(dmft.solve(linear, dmft.Lazy(discrete=True)).ntk)
    closure = dmft.LinearClosure(rtol=1e-13, max_iters=400)
    fd = lambda e: (np.asarray(dmft.solve(_with_gamma0(linear, e), closure).ntk) - K0) / e**2
    eps = 0.01
    exact, truncation = fd(eps), 2 * np.abs(fd(2 * eps) - fd(eps)) / 3
    z = (np.abs(K2 - exact) - truncation)[1:] / se[1:]
    print(
        f"L={L} identity: max |K2| {np.abs(exact).max():.3f}, max error {np.abs(K2 - exact).max():.2e}, "
        f"max z {z.max():.2f}"
    )
    assert z.max() < 5.5


def test_source_shift_is_the_derivative_of_the_gaussian_kernels():
    # Price's theorem against quadrature: d/de E[a(u) a(u)^T] for u ~ N(0, S + e dS), a = phi (moments
    # Q, M1) and a = phi' (R3, M2). Equal-time: central difference, error O(e^2) ~ 1e-8. Two-time
    # (the lazy S is constant in time, so pairs at one point are perfectly correlated and a
    # non-PSD dS leaves the Gaussian family): a PSD dS and a one-sided difference, error O(e).
    import jax.numpy as jnp

    from dmft.activations import gauss_hermite_pairs
    from dmft.solvers.perturbative import _derivative, _source_shift

    act = dmft.activations.Tanh()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4, 6))
    S = X @ X.T / 6
    d2 = _derivative(act.dfn)
    pairs = ((act.dfn, act.dfn), (d2, d2), (d2, act.fn), (_derivative(d2), act.dfn))
    M1, M2, Q, R3 = gauss_hermite_pairs(pairs, jnp.asarray(S))
    Y = rng.normal(size=(4, 4))
    dS, e = (Y + Y.T) / 2, 1e-4
    (pp, gp), (pm, gm) = act.kernels(jnp.asarray(S + e * dS)), act.kernels(jnp.asarray(S - e * dS))
    np.testing.assert_allclose((pp - pm) / (2 * e), _source_shift(jnp.asarray(dS), Q, M1, False), atol=1e-7)
    np.testing.assert_allclose((gp - gm) / (2 * e), _source_shift(jnp.asarray(dS), R3, M2, False), atol=1e-7)
    T, Z = 3, rng.normal(size=(12, 12))
    dS2, e = Z @ Z.T / 12, 1e-6
    (pp, gp), (p0, g0) = (
        act.kernels(jnp.asarray(np.kron(np.ones((T, T)), S) + e * dS2)),
        act.kernels(jnp.asarray(np.kron(np.ones((T, T)), S))),
    )
    dS2 = jnp.asarray(dS2.reshape(T, 4, T, 4))
    np.testing.assert_allclose(((pp - p0) / e).reshape(T, 4, T, 4), _source_shift(dS2, Q, M1, True), atol=2e-5)
    np.testing.assert_allclose(((gp - g0) / e).reshape(T, 4, T, 4), _source_shift(dS2, R3, M2, True), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("L", [2, 3])
def test_tanh_deep_matches_a_finite_difference_of_monte_carlo(L):
    # MonteCarlo at gamma0 = eps and 0 with one key: with antithetic sources (pairs +-r in every
    # layer) the sample set is closed under r -> -r, so its fixed point is exactly even in gamma0 and
    # (K(eps) - K(0)) / eps^2 = K2 + eps^2 K4 is its own sampled K2 (negative gamma0 cannot be used:
    # MonteCarlo zeroes the responses there). Jacobian responses: the Stein regression divides noise by
    # gamma0 (at eps = 0.05-0.1 its fixed point drifted by ~0.03-0.06 from the Jacobian one).
    # (Networks are the independent check: next test.) Tolerance: as the two-layer test, z < 7 with
    # the spread over 8 keys (t, 7 dof).
    data = dmft.datasets.sphere(3, 3, 0)
    problem = dmft.Problem(data, dmft.MLP(L, "tanh"), gamma0=1.0, t_max=2.0, n_steps=4)
    K2, se = _K2(_small_gamma(problem), dmft.solve(_small_gamma(problem), dmft.Perturbative(n_samples=131072), key=0))
    mc = dmft.MonteCarlo(
        n_samples=32768,
        chunk_size=8192,
        damping=1.0,
        rtol=1e-10,
        max_iters=60,
        responses="jacobian",
        sampling="antithetic",
    )
    K = lambda g, k: np.asarray(dmft.solve(_with_gamma0(problem, g), mc, key=k).ntk[-1])
    eps, keys = 0.1, range(8)
    K0 = [K(0.0, k) for k in keys]
    fds = np.array([(K(eps, k) - K0[k]) / eps**2 for k in keys])
    truncation = 2 * np.abs((K(2 * eps, 0) - K0[0]) / (2 * eps) ** 2 - fds[0]) / 3
    z, se_total = _z(K2, se, fds, truncation)
    print(
        f"L={L} tanh: K2(t_max) diag {np.diag(K2[-1]).round(4)}, Monte Carlo {np.diag(fds.mean(0)).round(4)}, "
        f"max error {np.abs(K2[-1] - fds.mean(0)).max():.2e}, max se {se_total.max():.1e}, max z {z.max():.2f}"
    )
    assert z.max() < 7


@pytest.mark.slow
def test_tanh_deep_matches_finite_networks():
    # A finite network is a deterministic function of gamma0 for given initial weights, and gamma0 ->
    # -gamma0 is w -> -w for the read-out, so [K_N(eps) + K_N(-eps) - 2 K_N(init)] / (2 eps^2) with one
    # initialisation is that network's K2 (odd orders cancel exactly; discrete GD with step eta0 dt,
    # the finite-width counterpart of the discrete DMFT). Its mean over seeds -> K2 as N grows, with
    # seed noise ~N^-1/2 and bias O(1/N). Tolerance: z < 7 with the spread over 8 seeds (t, 7 dof) plus
    # Perturbative's batch-means error, and the eps^2 K4 truncation estimated from the Monte Carlo
    # test above (|K4| < 2) added as 2 eps^2 = 0.02 slack.
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    from dmft.networks.train import train

    data = dmft.datasets.sphere(3, 3, 0)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=1.0, t_max=2.0, n_steps=4)
    K2, se = _K2(_small_gamma(problem), dmft.solve(_small_gamma(problem), dmft.Perturbative(n_samples=131072), key=0))
    eps, width = 0.1, 4096

    @jax.jit
    def network_K2(key, e):
        K = lambda g: train(eqx.tree_at(lambda q: q.gamma0, problem, g), width, key, method="gd").ntk
        Kp, Km = K(e), K(-e)  # traced gamma0: train's gamma0 > 0 check is for concrete values
        return (Kp[-1] + Km[-1] - 2 * Kp[0]) / (2 * e**2)

    nets = np.array([network_K2(jr.key(s), jnp.asarray(eps)) for s in range(8)])
    z, se_total = _z(K2, se, nets, 2 * eps**2)
    print(
        f"tanh L=2: K2(t_max) diag {np.diag(K2[-1]).round(4)}, "
        f"networks (N = {width}) {np.diag(nets.mean(0)).round(4)}, "
        f"max se {se_total.max():.1e}, max z {z.max():.2f}"
    )
    assert z.max() < 7
