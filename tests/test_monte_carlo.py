"""MonteCarlo: unbiased against exact answers, error bars that hold, its options and bad settings.

Error bars: `stderr` is the standard error of the mean of R = 8 independent replicas, `sd / sqrt(8)`.
An error against an exact answer is therefore `stderr * T_7`-distributed (Student's t with 7 degrees
of freedom): it exceeds 4 stderr with probability 0.5%. Comparisons of whole curves use L2 norms over
times and entries (pooling makes the per-entry multiplicity harmless).
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import integrate

import dmft
from dmft.solvers.monte_carlo import _spread_rtol

MC = dict(n_samples=2048)


def _linear_problem(L, gamma0, n_steps=12, P=6, P_test=2, sigmas=(1.0, 0.0)):
    data = dmft.datasets.sphere(P, 8, 0, P_test=P_test)
    net = dmft.MLP(L, "linear", sigma_w=sigmas[0], sigma_b=sigmas[1])
    return dmft.Problem(data, net, gamma0=gamma0, t_max=3.0, n_steps=n_steps)


def _within(sol, exact, fields=("loss", "ntk"), bound=4.0):
    """Largest `|error| / |stderr|` (L2 norms over times and entries) over `fields`."""
    ratios = []
    for field in fields:
        err = np.linalg.norm(np.asarray(getattr(sol, field)) - np.asarray(getattr(exact, field)))
        ratios.append(err / np.linalg.norm(np.asarray(sol.stderr[field])))
    print("|error| / |stderr|:", dict(zip(fields, np.round(ratios, 2))))
    return max(ratios) <= bound


@pytest.mark.parametrize(
    "L, gamma0, sigmas",
    [
        (1, 1.0, (1.0, 0.0)),
        (2, 1.0, (1.0, 0.0)),
        pytest.param(3, 1.5, (1.0, 0.0), marks=pytest.mark.slow),
        (1, 1.0, (0.8, 0.5)),
        (2, 1.0, (1.2, 0.5)),
    ],
)
def test_linear_activation_matches_closure(L, gamma0, sigmas):
    # Monte Carlo with phi = identity estimates exactly what the closure computes, on the fast path
    # (depth 1) and the deep path (layer 1 u constant in time, layer L r scalar, middle both two-time),
    # with and without weight and bias variances (THEORY 11: two independent implementations of the
    # sigma_w^2, sigma_b^2 factors).
    problem = _linear_problem(L, gamma0, sigmas=sigmas)
    exact = dmft.solve(problem, dmft.LinearClosure())
    sol = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    assert sol.result == dmft.RESULTS.successful and 0 < float(sol.noise_floor) < 0.1
    assert _within(sol, exact)


def test_a_strongly_feature_learning_deep_map_is_continued_in_time():
    # Depth 3, gamma0 = 2.5, t_max = 5: from the lazy start the first map returns kernels ~1e9 times its
    # input, and iterating the whole grid (undamped, damped at 0.5, or with bounded steps) goes
    # non-finite, while the fixed point itself attracts (a start at the closure's answer converges).
    # The pooled stage shrinks its time window to where the steps are bounded and widens it again as
    # it converges; the solve reaches the closure's answer (within 4 standard errors, as above).
    problem = dmft.Problem(dmft.datasets.sphere(8, 12, 0), dmft.MLP(3, "linear"), gamma0=2.5, t_max=5.0, n_steps=30)
    exact = dmft.solve(problem, dmft.LinearClosure())
    sol = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    assert sol.result == dmft.RESULTS.successful
    assert _within(sol, exact)


@pytest.mark.parametrize("L, act", [(1, "relu"), (2, "tanh"), pytest.param(3, "relu", marks=pytest.mark.slow)])
def test_small_gamma0_reproduces_lazy(L, act):
    # At gamma0 = 1e-3 the kernels are the lazy ones up to O(gamma0^2) = 1e-6 plus Monte Carlo noise.
    data = dmft.datasets.sphere(6, 8, 1, P_test=2)
    problem = dmft.Problem(data, dmft.MLP(L, act), gamma0=1e-3, t_max=3.0, n_steps=10)
    lazy = dmft.solve(problem, dmft.Lazy(discrete=True))
    mc = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    for field in ("loss", "ntk", "f_test"):
        err = np.linalg.norm(np.asarray(getattr(mc, field)) - np.asarray(getattr(lazy, field)))
        assert err <= 4 * np.linalg.norm(np.asarray(mc.stderr[field])) + 1e-5, field


def test_two_layer_whitened_closed_form():
    # THEORY 6 closed form (L = 1, linear, Kx = I) against the equal-time fast path: error = O(dt)
    # discretisation (first-order Euler, measured with the exact closure) plus 4 stderr.
    P, gamma0, t_max = 4, 2.0, 6.0
    X, y = np.sqrt(P) * np.eye(P), np.array([1.0, -0.5, 0.8, 0.3])
    ynorm = np.linalg.norm(y)
    ode = integrate.solve_ivp(
        lambda t, d: -2 / P * np.sqrt(1 + gamma0**2 * (ynorm - d) ** 2) * d,
        (0, t_max),
        [ynorm],
        rtol=1e-12,
        atol=1e-14,
        dense_output=True,
    )
    problem = dmft.Problem(dmft.Dataset(X, y), dmft.MLP(1, "linear"), gamma0=gamma0, t_max=t_max, n_steps=120)
    mc = dmft.solve(problem, dmft.MonteCarlo(n_samples=8192), key=0)
    closure = dmft.solve(problem, dmft.LinearClosure())
    delta = np.linalg.norm(y - np.asarray(mc.f), axis=1)
    disc = np.max(np.abs(np.linalg.norm(y - np.asarray(closure.f), axis=1) - ode.sol(np.asarray(mc.ts))[0]))
    se = np.max(np.asarray(mc.stderr["f"])) * np.sqrt(P)
    assert mc.Phi is None and mc.Phi_eq.shape == (1, 121, 4, 4)
    assert np.max(np.abs(delta - ode.sol(np.asarray(mc.ts))[0])) <= disc + 4 * se


def _stein_jacobian_none(key=0, **kwargs):
    data = dmft.datasets.sphere(4, 6, 2)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=1.5, t_max=3.0, n_steps=8)
    return [
        dmft.solve(problem, dmft.MonteCarlo(responses=r, **MC, **kwargs), key=key)
        for r in ("stein", "jacobian", "none")
    ]


@pytest.mark.slow
def test_stein_responses_are_causal_and_match_the_jacobian_route():
    # Same sources (same key) for all three. Abar is strictly causal (s < t), Bbar causal (s <= t),
    # and the Stein route's distance to the exact-per-sample Jacobian route must be a small fraction
    # (25%) of the response effect |Jacobian - gradient independence| (~0.015 in the final loss),
    # plus 4 stderr where the effect is below the noise (early times).
    stein, jac, gia = _stein_jacobian_none()
    not_before = np.triu(np.ones((9, 9)))[None, :, None, :, None]  # s >= t
    after = np.triu(np.ones((9, 9)), 1)[None, :, None, :, None]  # s > t
    assert np.allclose(np.asarray(stein.A) * not_before, 0) and np.allclose(np.asarray(stein.B) * after, 0)
    assert np.abs(np.asarray(stein.B) * (not_before - after)).max() > 0  # the equal-time Bbar(t, t)
    effect = np.abs(np.asarray(jac.loss - gia.loss))
    se = np.asarray(jac.stderr["loss"])
    assert effect[-1] > 8 * se[-1]  # the responses matter here
    assert np.all(np.abs(np.asarray(stein.loss - jac.loss)) <= 0.25 * effect + 4 * se)


def _one_step_responses(gamma0, key=1, **kwargs):
    """Abar^1, Bbar^1 of the first replica after one map application from the lazy start (tanh,
    depth 2, 4 points, 9 times), each as it acts on its fields: `Abar (G^2)^{1/2}`, `Bbar
    (Phi^1)^{1/2}` (n x n); only that action enters the equations."""
    data = dmft.datasets.sphere(4, 6, 2)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=gamma0, t_max=3.0, n_steps=8)
    solver = dmft.MonteCarlo(n_samples=8192, **kwargs)
    start = solver.init(problem, jax.random.key(0))
    lazy, replicas = start.q, solver.enter(problem, start)
    new = jax.tree.map(lambda x: x[0], solver.step(problem, replicas, jax.random.key(key)).reps)
    root = lambda K: np.real(__import__("scipy").linalg.sqrtm(np.asarray(K).reshape(36, 36)))
    return np.asarray(new.A[0]).reshape(36, 36) @ root(lazy.G[1]), np.asarray(new.B[0]).reshape(36, 36) @ root(
        lazy.Phi[0]
    )


@pytest.mark.slow
def test_antithetic_pairs_cut_the_stein_noise():
    # At gamma0 = 0.05, phi(h) depends on r only through the O(gamma0) feedback. The Stein sum
    # <phi e_r^T> carries the even part of phi (then divided by gamma0), which the pairs (e_u, +-e_r)
    # cancel exactly; likewise for g, odd in r at gamma0 = 0. The spread between two keys should
    # shrink by a factor of order 1 / gamma0 = 20 against plain sampling (measured: ~30); we require 4.
    spread = lambda **kw: [
        np.linalg.norm(a - b) for a, b in zip(_one_step_responses(0.05, 1, **kw), _one_step_responses(0.05, 2, **kw))
    ]
    # Without control variates: those subtract the lazy fields, which already removes the even part.
    plain = spread(sampling="plain", control_variates=False)
    anti = spread(sampling="antithetic", control_variates=False)
    print(f"Stein spread between two keys (Abar, Bbar): plain {plain}, antithetic {anti}")
    assert anti[0] < plain[0] / 4 and anti[1] < plain[1] / 4


@pytest.mark.slow
def test_jacobian_directions():
    # Along all (n+1) Pa eigenvectors, (R V) V^T = R: the full Jacobian up to rounding. Along fewer,
    # the dropped directions are those of least source variance, so the action on the fields
    # converges as directions are added.
    full = _one_step_responses(1.0, responses="jacobian")
    every = _one_step_responses(1.0, responses="jacobian", n_directions=36)
    np.testing.assert_allclose(every[0], full[0], atol=1e-10)
    np.testing.assert_allclose(every[1], full[1], atol=1e-10)
    errs = [np.linalg.norm(_one_step_responses(1.0, responses="jacobian", n_directions=k)[0] - full[0]) for k in (2, 8)]
    print(f"distance of the truncated Abar to the full one: {errs}")
    assert errs[1] < errs[0]


def test_gradient_independence_is_worse_at_depth():
    # Dropping the responses (A = B = 0) is exact only at depth 1; at depth 2 and gamma0 = 1.5 its
    # error against the exact closure must exceed the full solution's by more than 4 stderr.
    problem = _linear_problem(2, 1.5)
    exact = dmft.solve(problem, dmft.LinearClosure())
    full = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    gia = dmft.solve(problem, dmft.MonteCarlo(responses="none", **MC), key=0)
    err_full = np.max(np.abs(full.loss - exact.loss))
    err_gia = np.max(np.abs(gia.loss - exact.loss))
    print(f"max loss error: full {err_full:.4f}, gradient independence {err_gia:.4f}")
    assert err_gia - err_full > 4 * np.max(np.asarray(full.stderr["loss"]))


@pytest.mark.parametrize(
    "sampling",
    ["sobol", pytest.param("plain", marks=pytest.mark.slow), pytest.param("antithetic", marks=pytest.mark.slow)],
)
def test_same_key_same_result_whatever_the_chunks(sampling):
    # chunk_size is a memory knob: every sample is a fixed function of the key and its index.
    data = dmft.datasets.sphere(5, 4, 0, P_test=2)
    problem = dmft.Problem(data, dmft.MLP(2, "relu"), gamma0=1.0, t_max=2.0, n_steps=6)
    solve = lambda chunk: dmft.solve(
        problem, dmft.MonteCarlo(n_samples=512, chunk_size=chunk, sampling=sampling, max_iters=3), key=3, throw=False
    )
    # Chunks change only the order of the float64 sums (relative round-off ~1e-16 x sqrt(chunks)),
    # which the Stein regressions amplify by up to their condition number ~1 / rcond = 350 (64 samples
    # per replica) per iteration, ~1e-12 after 3 iterations: 1e-10 is above that and far below any
    # sampling difference (~S^-1/2 = 4e-2). (Square roots of the eigenvalues of Kx that are round-off,
    # 7 points in 4 dimensions, would make that ~sqrt(eps) = 1e-8: `_sampling._roots` zeroes them.)
    a, b = solve(64), solve(16)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-10)
    np.testing.assert_array_equal(a.loss, solve(64).loss)
    assert a.Phi.shape == a.G.shape == (2, 7, 7, 7, 7) and a.A.shape == a.B.shape == (1, 7, 7, 7, 7)
    assert a.stderr["ntk"].shape == (7, 5, 5) and a.stderr["f_test"].shape == (7, 2)


def test_the_warm_up_reaches_the_same_fixed_point(monkeypatch):
    # The pooled stage's first iterations take half the replicas' samples (`_PooledStage`); its fixed
    # point is the full map's either way. Each solve stops at a change of at most a quarter of the
    # noise floor, with the map contracting by at least half per iteration here, so it is within
    # ~0.25 floor of the fixed point, and the two solves within ~0.5 floor of each other: bound 1.
    from dmft.solvers import monte_carlo

    data = dmft.datasets.sphere(8, 12, 0)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=1.0, t_max=4.0, n_steps=10)
    pooled_iterations = lambda sol: int(np.argmax(np.asarray(sol.residuals) == 1.0))  # the replicas' first
    warm, loose = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0), dmft.MonteCarlo(rtol=1e9, **MC)
    # A warm-up iterate never ends the stage, whatever the tolerance.
    assert pooled_iterations(dmft.solve(problem, loose, key=0)) >= 2
    monkeypatch.setattr(monte_carlo, "_WARMUP_MAX", 0)
    jax.clear_caches()  # the constant is read when the solve is traced
    cold = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    assert pooled_iterations(dmft.solve(problem, loose, key=0)) == 1
    for name in ("Phi", "G"):
        a, b = np.asarray(getattr(warm, name)), np.asarray(getattr(cold, name))
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= float(cold.noise_floor)


def test_explicit_rtol_and_the_noise_floor():
    # Default: the pooled stage stops when the change is a quarter of the noise floor (or the floor
    # itself once the change stalls), then the replica stage iterates until the replicas' spread
    # changes by at most its tolerance; an explicit rtol replaces the floor.
    problem = _linear_problem(2, 1.0)
    solver = dmft.MonteCarlo(**MC)
    sol = dmft.solve(problem, solver, key=0)
    short = dmft.solve(problem, dmft.MonteCarlo(**MC | dict(max_iters=1)), key=0, throw=False)
    assert 0 < float(sol.noise_floor) < 0.1
    res = np.asarray(sol.residuals)
    it = int(sol.iterations)
    assert np.isnan(res[it:]).all() and np.isfinite(res[:it]).sum() == it
    assert res[it - 1] <= _spread_rtol(solver.n_replicas)  # the replica stage's tolerance on the change of the spread
    loose = dmft.solve(problem, dmft.MonteCarlo(rtol=0.05, **MC), key=0)
    assert int(loose.iterations) < it
    assert short.result == dmft.RESULTS.max_iters_reached  # one iteration per stage is not enough


def test_control_variates_fall_back_for_a_custom_activation():
    # A custom callable has no closed-form control pair: the default (None) runs without control
    # variates; asking for them explicitly says what to change.
    data = dmft.datasets.sphere(4, 6, 0)
    problem = dmft.Problem(data, dmft.MLP(2, lambda h: jnp.sin(h)), gamma0=1.0, t_max=1.0, n_steps=4)
    sol = dmft.solve(problem, dmft.MonteCarlo(n_samples=512), key=0)
    assert np.all(np.isfinite(sol.loss))
    with pytest.raises(ValueError, match="control_variates=True needs an activation with a closed-form control pair"):
        dmft.solve(problem, dmft.MonteCarlo(control_variates=True), key=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_samples=1), "n_replicas must be >= 2"),
        (dict(n_replicas=1), "n_replicas must be >= 2"),
        (dict(n_samples=1000, n_replicas=8, sampling="plain", chunk_size=30), "chunk_size 30 must divide"),
        (dict(n_directions=0), "n_directions must be None or in"),
        (dict(responses="exact"), "responses must be one of"),
        (dict(sampling="qmc"), "sampling must be one of"),
        (dict(n_samples=1000), "power of 2"),
        (dict(sampling="antithetic", n_samples=24, n_replicas=8), "even chunk_size"),
        (dict(damping=1.5), "damping must be None"),
        (dict(rtol=-1.0), "rtol must be None"),
        (dict(rcond=0.0), "rcond must be None"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dmft.solve(_linear_problem(2, 1.0), dmft.MonteCarlo(**kwargs), key=0)


def test_default_samples_follow_the_accuracy_target():
    # n_samples=None: 4096, and 16384 for relu at depth >= 3, whose error bar at 4096 samples exceeds the
    # half percent that test_finite_width.py's slow test holds the defaults to. An explicit S is kept.
    problem = lambda L, act: dmft.Problem(dmft.datasets.sphere(4, 4, 0), dmft.MLP(L, act), n_steps=3)
    samples = lambda L, act, **kw: dmft.estimate(problem(L, act), dmft.MonteCarlo(**kw)).sizes["samples"]
    assert samples(3, "relu") == samples(4, "relu") == 16384
    assert samples(1, "relu") == samples(2, "relu") == samples(3, "tanh") == 4096
    assert samples(3, "relu", n_samples=2048) == 2048
    assert dmft.MonteCarlo().sized(problem(3, "relu")).n_samples == 16384


def test_first_order_root_near_a_known_eigensystem():
    # factor_near expands the symmetric root around K0's eigensystem: its error is second order in the
    # perturbation, so halving it quarters the error, up to the third-order term, at most eps |E| / lam_min
    # = 1e-3 * 9 / 0.1 = 9% of the second here (half that in the ratio); and it is exact at K0.
    from dmft.solvers._sampling import factor, factor_near

    A, E = np.random.default_rng(0).normal(size=(2, 40, 40))
    K0, E = A @ A.T / 40 + 0.1 * np.eye(40), (E + E.T) / 2
    lam, V = np.linalg.eigh(K0)
    root = lambda eps, tol=np.inf: factor_near(K0 + eps * E, (V, lam), 1e-3, tol)[0]
    error = lambda eps: np.abs(root(eps) - factor(K0 + eps * E)[0]).max()
    assert error(0.0) < 1e-12
    assert 3.6 < error(1e-3) / error(5e-4) < 4.4
    # Far from K0 (the square of the expansion overshoots K by more than tol of it) the exact root.
    np.testing.assert_array_equal(root(0.5, 1e-2), factor(K0 + 0.5 * E)[0])
    assert np.abs(root(1e-3, 1e-2) - factor(K0 + 1e-3 * E)[0]).max() == error(1e-3)


def test_root_of_a_singular_covariance_is_stable_to_round_off():
    # Kx of 12 points in 4 dimensions repeated over 10 times (layer 1's sources) has rank 4 of 120: eigh
    # returns the other 116 eigenvalues as round-off (1.3 eps max(lam) at most). A perturbation of K at
    # round-off (relative 1e-15) must move its root by round-off too (the root's condition number is
    # ~sqrt(lam_max / lam_min) = 2 on the genuine eigenvalues here: bound 1e-13 relative), not by the
    # ~sqrt(1e-15) = 3e-8 that square roots of the round-off eigenvalues would add.
    from dmft.solvers._sampling import factor

    Kx = np.asarray(dmft.datasets.sphere(12, 4, 0).Kx)
    K = np.kron(np.ones((10, 10)), Kx)
    E = np.random.default_rng(0).normal(size=K.shape)
    M, dM = factor(K)[0], factor(K + 1e-15 * np.abs(K).max() * (E + E.T) / 2)[0]
    assert np.abs(dM - M).max() <= 1e-13 * np.abs(M).max()
    np.testing.assert_allclose(M @ M, K, atol=1e-13 * np.abs(K).max())


def test_sobol_dimension_limit():
    problem = dmft.Problem(dmft.datasets.sphere(30, 4, 0), dmft.MLP(2, "tanh"), n_steps=400)
    with pytest.raises(ValueError, match='use sampling="plain"'):
        dmft.MonteCarlo().validate(problem)
    # Depth 1 draws only the points' u and one r per sample, whatever the number of steps.
    dmft.MonteCarlo().validate(dmft.Problem(dmft.datasets.sphere(30, 4, 0), dmft.MLP(1, "tanh"), n_steps=400))


def test_sobol_axes_do_not_depend_on_the_eigenvector_signs():
    """A key must give the same samples on every backend, but eigh returns each eigenvector up to a
    sign that differs between LAPACK and cuSOLVER. Permuting the points permutes the axes' rows
    exactly, however eigh signs the permuted matrix's eigenvectors; with classes, the degenerate
    eigenspaces are spanned by the classes' unit vectors."""
    from dmft.solvers._sampling import sobol_axes

    x = np.random.default_rng(0).standard_normal((5, 7))
    K0 = jnp.asarray(x @ x.T / 7)
    perm = np.array([3, 0, 4, 1, 2])
    T, C = 3, 2
    rows = (np.arange(T)[:, None, None] * 5 * C + perm[None, :, None] * C + np.arange(C)).ravel()
    axes, axes_perm = sobol_axes(K0, T, C), sobol_axes(K0[perm][:, perm], T, C)
    np.testing.assert_allclose(axes_perm, axes[rows], atol=1e-12)
    np.testing.assert_allclose(axes.T @ axes, np.eye(T * 5 * C), atol=1e-12)
    # The leading axis: the slowest time mode of the top eigenvector, for class 0 alone.
    lam, V = np.linalg.eigh(np.asarray(K0))
    top = V[:, -1] * np.sign(V[np.argmax(np.abs(V[:, -1])), -1])
    np.testing.assert_allclose(axes[:, 0], np.kron(np.full(T, T**-0.5), np.kron(top, [1.0, 0.0])), atol=1e-12)


def test_folded_axes_and_transposed_products_are_the_same_sums():
    """The pooled stage draws its sources as `(M V) e'` instead of `M (V e')` where that is cheaper, and
    takes float64 moments `X^T Y` with the transpose made first: the same numbers up to rounding (sums
    of up to 64 products of order-1 numbers: ~64 ulps, 1e-12 in float64 and 1e-4 in float32)."""
    from dmft.solvers._sampling import fold_axes, normals, sources, tdot

    rng = np.random.default_rng(1)
    T, Pa, n = 3, 4, 12
    A, B, Q = rng.standard_normal((3, n, n))
    M_u, M_r = A @ A.T / n, B @ B.T / n
    axes = (np.linalg.qr(Q)[0], None)  # r without axes: its factor is not folded
    e_u, e_r = normals("sobol", jr.key(0), 0, 16, 16, n, n, (None, None), jnp.float64)
    rotated = normals("sobol", jr.key(0), 0, 16, 16, n, n, axes, jnp.float64)
    for n_samples, folded in ((16, True), (8, False)):  # folding an (n, n) factor pays with >= n samples
        factors, rest = fold_axes((M_u, M_r), axes, n_samples)
        assert (rest[0] is None) == folded and rest[1] is None
        e = (e_u, e_r) if folded else (e_u @ rest[0].T, e_r)
        got, want = sources(*e, *factors, T, Pa, False, False), sources(*rotated, M_u, M_r, T, Pa, False, False)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-12)
    for dtype, atol in ((jnp.float64, 1e-12), (jnp.float32, 1e-4)):
        X, Y = (jnp.asarray(rng.standard_normal((64, k)), dtype) for k in (5, 7))
        np.testing.assert_allclose(tdot(X, Y), np.asarray(X, np.float64).T @ np.asarray(Y, np.float64), atol=atol)


@pytest.mark.parametrize("R", [2, 3, 7, 8])
def test_replica_mean_and_spread_are_numpys(R):
    # The halving sums over the replica axis (odd counts fold the last slice into the first) against
    # numpy's reductions: the same sums in another order, float64 rounding.
    from dmft.solvers._sampling import replica_mean, replica_std

    X = np.random.default_rng(R).standard_normal((R, 3, 4))
    np.testing.assert_allclose(replica_mean(jnp.asarray(X)), X.mean(0), rtol=1e-13)
    np.testing.assert_allclose(replica_std(jnp.asarray(X)), X.std(0, ddof=1), rtol=1e-13)


def test_needs_a_key():
    with pytest.raises(ValueError, match="pass key="):
        dmft.solve(_linear_problem(2, 1.0), dmft.MonteCarlo())


# ---- validations (slow) --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("L", [1, 3])
def test_error_bars_cover_the_exact_answer(L):
    # Over 64 keys, +-2 stderr must cover the exact final loss and final NTK diagonal in 90-99% of
    # the (key, quantity) pairs (91.4% for a T_7-distributed error, more if the replicas' spread is
    # conservative). Entries of one key are correlated, so the effective number of checks is between
    # 64 and 64 * 7: the binomial spread of the fraction is 1-3%.
    problem = _linear_problem(L, 1.5)
    exact = dmft.solve(problem, dmft.LinearClosure())
    truth = np.concatenate([[float(exact.loss[-1])], np.diag(np.asarray(exact.ntk[-1]))])
    covered = []
    for k in range(64):
        sol = dmft.solve(problem, dmft.MonteCarlo(**MC), key=k)
        est = np.concatenate([[float(sol.loss[-1])], np.diag(np.asarray(sol.ntk[-1]))])
        se = np.concatenate([[float(sol.stderr["loss"][-1])], np.diag(np.asarray(sol.stderr["ntk"][-1]))])
        covered.append(np.abs(est - truth) <= 2 * se)
    fraction = float(np.mean(covered))
    print(f"L={L}: +-2 stderr covers the exact answer in {100 * fraction:.1f}% of {np.size(covered)} checks")
    assert 0.90 <= fraction <= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_error_bars_match_the_spread_over_keys(act):
    # The mean reported stderr of the final loss against the standard deviation of the final loss
    # over 32 keys: within a factor 1.5 (an exact one averages 0.96, the mean of an sd with 7 degrees
    # of freedom). 32 keys, not 16: the answers of Sobol + control-variate solves have heavy tails over
    # keys, and the sd over 16 keys is far less precise than the Gaussian ~18% (tanh: 3.98e-4 over keys
    # 0-15, 8.34e-4 over keys 16-31).
    data = dmft.datasets.sphere(8, 12, 0)
    problem = dmft.Problem(data, dmft.MLP(2, act), gamma0=1.0, t_max=4.0, n_steps=20)
    sols = [dmft.solve(problem, dmft.MonteCarlo(n_samples=4096), key=k) for k in range(32)]
    final = np.array([float(s.loss[-1]) for s in sols])
    reported = np.mean([float(s.stderr["loss"][-1]) for s in sols])
    ratio = reported / final.std(ddof=1)
    print(f"{act}: mean stderr {reported:.2e}, sd over 32 keys {final.std(ddof=1):.2e}, ratio {ratio:.2f}")
    assert 1 / 1.5 <= ratio <= 1.5
