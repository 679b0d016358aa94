import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import dmft
from dmft.solvers.monte_carlo import _factor

MC = dict(n_samples=4096, chunk_size=1024)


def _linear_problem(L, gamma0, n_steps=12, P=6, P_test=2):
    data = dmft.datasets.sphere(P, 8, 0, P_test=P_test)
    return dmft.Problem(data, dmft.MLP(L, "linear"), gamma0=gamma0, t_max=3.0, n_steps=n_steps)


def _key_spread(problem, solver, keys, field="loss"):
    """Per-time mean and standard error over independent keys (captures the full Monte Carlo error,
    including its feedback through the self-consistency, unlike the batch-means stderr)."""
    runs = np.stack([np.asarray(getattr(dmft.solve(problem, solver, key=k), field)) for k in keys])
    return runs.mean(0), runs.std(0, ddof=1) / np.sqrt(len(keys))


@pytest.mark.parametrize("L, gamma0", [(2, 1.0), (3, 1.5)])
def test_linear_activation_matches_closure(L, gamma0):
    # Monte Carlo with phi = identity estimates exactly the quantities the closure computes. The
    # mean over 4 independent keys must lie within 4 standard errors, compared over the whole
    # trajectory in the L2 norm over time: a per-time standard error from 4 keys has 3 degrees of
    # freedom and is occasionally tiny by chance; the norm pools all times.
    problem = _linear_problem(L, gamma0)
    exact = dmft.solve(problem, dmft.LinearClosure())
    mean, se = _key_spread(problem, dmft.MonteCarlo(**MC), range(4))
    assert np.linalg.norm(mean - exact.loss) <= 4 * np.linalg.norm(se)


@pytest.mark.slow
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("gamma0", [0.5, 1.0, 1.5])
def test_linear_activation_matches_closure_full_grid(L, gamma0):
    problem = _linear_problem(L, gamma0)
    exact = dmft.solve(problem, dmft.LinearClosure())
    for field in ("loss", "ntk"):
        mean, se = _key_spread(problem, dmft.MonteCarlo(n_samples=8192, chunk_size=2048), range(4), field)
        err = np.linalg.norm(mean - np.asarray(getattr(exact, field)))
        print(f"L={L} gamma0={gamma0} {field}: |err| / |SE| = {err / np.linalg.norm(se):.2f}")
        assert err <= 4 * np.linalg.norm(se)  # L2 over time (and entries), as in the fast test


@pytest.mark.slow
def test_error_shrinks_as_inverse_sqrt_samples():
    # RMS error over independent keys of the final loss against the exact closure; Monte Carlo
    # error ~ S^-1/2, so the fitted slope is -1/2 (tolerance 0.2: the RMS over 6 keys is itself
    # uncertain by ~30%, i.e. +-0.15 in slope over a 16x range of S). Jacobian responses: the earlier
    # ridge Stein estimate (since replaced by the causal regression) had a bias floor here (RMS
    # 9.6e-4, 3.5e-4, 4.2e-4 at S = 256, 1024, 4096, slope -0.30).
    problem = _linear_problem(2, 1.0)
    exact = float(dmft.solve(problem, dmft.LinearClosure()).loss[-1])
    sizes, rms = [256, 1024, 4096], []
    for S in sizes:
        errs = [
            float(dmft.solve(problem, dmft.MonteCarlo(n_samples=S, chunk_size=S, responses="jacobian"), key=k).loss[-1])
            - exact
            for k in range(6)
        ]
        rms.append(np.sqrt(np.mean(np.square(errs))))
    slope = stats.linregress(np.log(sizes), np.log(rms)).slope
    print("RMS errors", rms, "slope", slope)
    assert abs(slope + 0.5) < 0.2


@pytest.mark.parametrize("L, act", [(1, "relu"), (2, "tanh"), (3, "relu")])
def test_small_gamma0_reproduces_lazy(L, act):
    # At gamma0 = 1e-3 the kernels are the lazy ones up to O(gamma0^2) = 1e-6 plus Monte Carlo noise.
    # With gamma0 ~ 0 there is no feedback of that noise (Delta does not enter the fields), so the
    # batch-means standard errors are the full error. Compared in the L2 norm over all times and
    # entries (a per-entry test over ~400 NTK entries would fail by multiplicity). The SE itself is
    # estimated from n_batches = 8 batch means, so error / SE is Student-t with 7 degrees of freedom,
    # whose tails are heavy (P(|t| > 4) = 0.5%; seen: 4.2 for one of six keys, the rest <= 2.4): the
    # bound is the two-sided 1e-3 quantile of t_7 (5.41 SE) + 1e-5.
    data = dmft.datasets.sphere(6, 8, 1, P_test=2)
    problem = dmft.Problem(data, dmft.MLP(L, act), gamma0=1e-3, t_max=3.0, n_steps=10)
    lazy = dmft.solve(problem, dmft.Lazy(discrete=True))
    mc = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    for field in ("loss", "ntk", "f_test"):
        err = np.linalg.norm(np.asarray(getattr(mc, field)) - np.asarray(getattr(lazy, field)))
        assert err <= stats.t.ppf(1 - 1e-3 / 2, df=7) * np.linalg.norm(np.asarray(mc.stderr[field])) + 1e-5, field


def test_two_layer_whitened_closed_form():
    # THEORY 6 closed form (L = 1, linear, Kx = I) against the equal-time fast path: error = O(dt)
    # discretisation (first-order Euler, measured ~1e-2 of |y| at dt = 0.05 with the exact closure)
    # plus Monte Carlo error (4 batch SE).
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
    mc = dmft.solve(problem, dmft.MonteCarlo(n_samples=16384, chunk_size=4096), key=0)
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


def test_stein_responses_are_causal_and_move_towards_the_jacobian_route():
    # Same sources (same key) for all three. Abar is strictly causal (s < t), Bbar causal (s <= t), and
    # switching them on must move the loss from gradient independence towards the exact-per-sample
    # Jacobian route by more than the Monte Carlo noise (the response effect here is ~10 batch SE,
    # so 4 SE is a margin, not a tight bound).
    stein, jac, gia = _stein_jacobian_none()
    not_before = np.triu(np.ones((9, 9)))[None, :, None, :, None]  # s >= t
    after = np.triu(np.ones((9, 9)), 1)[None, :, None, :, None]  # s > t
    assert np.allclose(np.asarray(stein.A) * not_before, 0) and np.allclose(np.asarray(stein.B) * after, 0)
    assert np.abs(np.asarray(stein.B) * (not_before - after)).max() > 0  # the equal-time Bbar(t, t)
    se = np.asarray(jac.stderr["loss"])[-1]
    assert float(gia.loss[-1] - stein.loss[-1]) > 4 * se and float(stein.loss[-1] - jac.loss[-1]) < float(
        gia.loss[-1] - jac.loss[-1]
    )


def test_stein_captures_the_response_effect():
    # For each of two keys, with the same quasi-random sources, the Stein route's distance to the
    # Jacobian route must be a small fraction (25%) of the response effect |Jacobian - gradient
    # independence| (~0.015 in the final loss), plus 4 batch standard errors where the effect itself
    # is below the noise (t <= 0.75 here: effect <= 9e-4). Measured: 1.9% / 1.9% at the final time
    # (plain sampling: 6.6% / 8.7%). Before the causal regression (a ridge inverse of the whole
    # covariance, then the causal mask) Stein missed 12% / 36% of it.
    for key in (0, 1):
        stein, jac, gia = _stein_jacobian_none(key, sampling="sobol")
        effect = np.abs(np.asarray(jac.loss - gia.loss))
        se = np.asarray(jac.stderr["loss"])
        assert np.all(np.abs(np.asarray(stein.loss - jac.loss)) <= 0.25 * effect + 4 * se)
        assert abs(float(stein.loss[-1] - jac.loss[-1])) <= 0.25 * effect[-1]


def _one_step_responses(gamma0, key=1, **kwargs):
    """Abar^1, Bbar^1 after one map application from the lazy start (tanh, depth 2, 4 points, 9
    times), each as it acts on its fields: `Abar (G^2)^{1/2}`, `Bbar (Phi^1)^{1/2}` (n x n). Only
    that action enters the equations (Abar acts on g^2, whose covariance is G^2); directions outside
    the range, which Stein cannot see and the Jacobian route does, drop out."""
    data = dmft.datasets.sphere(4, 6, 2)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=gamma0, t_max=3.0, n_steps=8)
    solver = dmft.MonteCarlo(n_samples=4096, chunk_size=1024, **kwargs)
    state = solver.init(problem, jax.random.key(0))
    new = solver.step(problem, state, jax.random.key(key))
    root = lambda K: _factor(K.reshape(36, 36))[0]
    return np.asarray(new.A[0].reshape(36, 36) @ root(state.G[1])), np.asarray(
        new.B[0].reshape(36, 36) @ root(state.Phi[0])
    )


def test_antithetic_pairs_cut_the_stein_noise():
    # At gamma0 = 0.05, phi(h) depends on r only through the O(gamma0) feedback. The plain Stein sum
    # <phi e_r^T> carries the even part of phi (noise ~ std(phi) / sqrt(S) per entry, then divided
    # by gamma0), which the pairs (e_u, +-e_r) cancel exactly; what is left is noise of the size of
    # the response itself / sqrt(S). Likewise g = phi'(h) z is odd in r at gamma0 = 0, so in the
    # pair sum of g e_u^T (same e_u) the leading part cancels. So the spread between two keys should
    # shrink by a factor of order 1 / gamma0 = 20 (measured: 31 for Abar, 25 for Bbar); we require 4.
    spread = lambda **kw: [
        np.linalg.norm(a - b) for a, b in zip(_one_step_responses(0.05, 1, **kw), _one_step_responses(0.05, 2, **kw))
    ]
    plain, anti = spread(sampling="plain"), spread(sampling="antithetic")
    print(f"Stein spread between two keys (Abar, Bbar): plain {plain}, antithetic {anti}")
    assert anti[0] < plain[0] / 4 and anti[1] < plain[1] / 4


def test_sobol_matches_closure():
    # Randomised quasi-Monte Carlo is unbiased (each point uniform), so a linear two-layer network
    # must agree with the closure within 4 standard errors over independent keys (as above). rtol
    # 1e-8, not the default 1e-2: the default stopping error (~2.5e-4 in the loss here, the same for
    # plain sampling at S = 262144) is 6x the quasi-random error at S = 4096 (measured: 4.5e-5).
    problem = _linear_problem(1, 1.0)
    exact = dmft.solve(problem, dmft.LinearClosure())
    mean, se = _key_spread(problem, dmft.MonteCarlo(sampling="sobol", rtol=1e-8, max_iters=200, **MC), range(4))
    print(f"sobol vs closure: |err| / |SE| = {np.linalg.norm(mean - exact.loss) / np.linalg.norm(se):.2f}")
    assert np.linalg.norm(mean - exact.loss) <= 4 * np.linalg.norm(se)


def test_sobol_cuts_the_spread():
    # Depth-1 tanh at gamma0 = 1: spread over 8 independent keys of the final loss, plain vs
    # randomised Sobol sources at the same S (measured over 16 keys: 7.0x smaller for the loss,
    # 3.4x for the NTK). Required: 2x for the loss. With 7 degrees of freedom each, the ratio of two
    # sample sds of equal true sd exceeds 2 with probability ~4% (F(7, 7) > 4), and a true ratio of 7
    # is seen below 2 with probability < 1%.
    data = dmft.datasets.sphere(8, 12, 0)
    problem = dmft.Problem(data, dmft.MLP(1, "tanh"), gamma0=1.0, t_max=6.0, n_steps=30)
    spread = lambda sampling: np.std(
        [float(dmft.solve(problem, dmft.MonteCarlo(sampling=sampling, **MC), key=k).loss[-1]) for k in range(8)], ddof=1
    )
    plain, sobol = spread("plain"), spread("sobol")
    print(f"sd of the final loss over 8 keys: plain {plain:.2e}, sobol {sobol:.2e} ({plain / sobol:.1f}x)")
    assert sobol < plain / 2


@pytest.mark.parametrize("L", [1, 3])
def test_control_variates_match_closure(L):
    # Control variates subtract the lazy fields' moments and add back their exact means, so the
    # estimate stays unbiased: linear networks (whose control pair is the identity itself) agree
    # with the closure within 4 standard errors over keys, as above, on the two-layer fast path and
    # the deep path (first layer u constant in time, last layer r scalar, middle both two-time).
    # rtol 1e-5: the default stopping error would be comparable to the reduced Monte Carlo error.
    problem = _linear_problem(L, 1.5)
    exact = dmft.solve(problem, dmft.LinearClosure())
    solver = dmft.MonteCarlo(control_variates=True, rtol=1e-5, max_iters=200, **MC)
    mean, se = _key_spread(problem, solver, range(4))
    print(
        f"L={L} control variates vs closure: |err| / |SE| = {np.linalg.norm(mean - exact.loss) / np.linalg.norm(se):.2f}"
    )
    assert np.linalg.norm(mean - exact.loss) <= 4 * np.linalg.norm(se)


def test_control_variates_cut_the_spread_without_bias():
    # Depth-2 tanh at gamma0 = 1 (control pair: the fitted erf / Gaussian surrogate): over 8 keys
    # each, the control-variate mean must agree with plain sampling's within 4 standard errors of
    # the difference (a wrong exact mean would bias it), and its spread of the final loss must be at
    # least 2x smaller (measured: 6.1x over keys 0-5, 4.5x over these keys 0-7). With 7 degrees of
    # freedom each, a ratio of sample sds above 2 at equal true sd has probability ~4% (F(7, 7) > 4),
    # and a true ratio of 4.5 falls below 2 with probability ~2% (F(7, 7) > 5.1).
    data = dmft.datasets.sphere(6, 10, 0)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=1.0, t_max=3.0, n_steps=15)
    final = lambda cv: np.array(
        [
            float(dmft.solve(problem, dmft.MonteCarlo(control_variates=cv, rtol=1e-3, **MC), key=k).loss[-1])
            for k in range(8)
        ]
    )
    plain, cv = final(False), final(True)
    print(
        f"final loss over 8 keys: plain {plain.mean():.5f} sd {plain.std(ddof=1):.2e}, control variates {cv.mean():.5f} sd {cv.std(ddof=1):.2e}"
    )
    assert abs(plain.mean() - cv.mean()) <= 4 * np.sqrt((plain.var(ddof=1) + cv.var(ddof=1)) / 8)
    assert cv.std(ddof=1) < plain.std(ddof=1) / 2


def test_undamped_start_reaches_the_same_fixed_point_sooner():
    # Damping changes the path of the iteration, not the fixed point of the (deterministic,
    # common-random-number) map: with undamped steps while the change is above 0.1, a tanh depth-3
    # solve converged to rtol 1e-5 must agree with the default path's to about rtol / (1 - lambda)
    # per solve (lambda ~ 0.7, the undamped map's contraction in the tail: ~3e-5); 1e-4 relative is
    # that margin. At the default rtol it takes fewer iterations (measured: 9 instead of 12 here,
    # 11 instead of 17 on the benchmark problem).
    data = dmft.datasets.sphere(6, 8, 0, target="noise")
    problem = dmft.Problem(data, dmft.MLP(3, "tanh"), gamma0=1.0, t_max=4.0, n_steps=20)
    MC2 = dict(n_samples=2048, chunk_size=1024)
    tight = dict(rtol=1e-5, max_iters=300, **MC2)
    a = dmft.solve(problem, dmft.MonteCarlo(**tight), key=0)
    b = dmft.solve(problem, dmft.MonteCarlo(undamped_above=0.1, **tight), key=0)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-4)
    assert np.linalg.norm(b.ntk - a.ntk) <= 1e-4 * np.linalg.norm(a.ntk)  # relative in norm, as rtol is
    default = dmft.solve(problem, dmft.MonteCarlo(**MC2), key=0)
    fast = dmft.solve(problem, dmft.MonteCarlo(undamped_above=0.1, **MC2), key=0)
    print(f"iterations to rtol 1e-2: damped {int(default.iterations)}, undamped start {int(fast.iterations)}")
    assert int(fast.iterations) < int(default.iterations)


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
    # error against the exact closure must exceed the full solution's by more than the Monte Carlo
    # noise (4 batch SE; measured: 0.0225 vs 0.0050).
    problem = _linear_problem(2, 1.5)
    exact = dmft.solve(problem, dmft.LinearClosure())
    full = dmft.solve(problem, dmft.MonteCarlo(**MC), key=0)
    gia = dmft.solve(problem, dmft.MonteCarlo(responses="none", **MC), key=0)
    err_full = np.max(np.abs(full.loss - exact.loss))
    err_gia = np.max(np.abs(gia.loss - exact.loss))
    print(f"max loss error: full {err_full:.4f}, gradient independence {err_gia:.4f}")
    assert err_gia - err_full > 4 * np.max(np.asarray(full.stderr["loss"]))


def test_same_key_same_result_and_shapes():
    data = dmft.datasets.sphere(5, 4, 0, P_test=2)
    problem = dmft.Problem(data, dmft.MLP(2, "relu"), gamma0=1.0, t_max=2.0, n_steps=6)
    # 512 samples: the noise floor may sit above rtol, so inspect the result instead of throwing.
    solver = dmft.MonteCarlo(n_samples=512, chunk_size=256, max_iters=10)
    a = dmft.solve(problem, solver, key=3, throw=False)
    b = dmft.solve(problem, solver, key=3, throw=False)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.Phi.shape == a.G.shape == (2, 7, 7, 7, 7) and a.A.shape == a.B.shape == (1, 7, 7, 7, 7)
    assert a.stderr["ntk"].shape == (7, 5, 5) and a.stderr["f_test"].shape == (7, 2)
    sobol = dmft.solve(
        problem, dmft.MonteCarlo(n_samples=512, chunk_size=256, sampling="sobol", max_iters=10), key=3, throw=False
    )
    assert np.all(np.isfinite(sobol.loss)) and sobol.stderr["ntk"].shape == (7, 5, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_samples=1), "n_samples must be >= 2"),
        (dict(n_samples=1000, chunk_size=300), "chunk_size 300 must divide"),
        (dict(n_directions=0), "n_directions must be None or in"),
        (dict(responses="exact"), "responses must be one of"),
        (dict(sampling="qmc"), "sampling must be one of"),
        (dict(sampling="sobol", n_samples=1000, chunk_size=1000), "power of 2"),
        (dict(damping=1.5), "damping must be in"),
        (dict(undamped_above=1e-3), "undamped_above must be None or above rtol"),
    ],
)
def test_bad_settings(kwargs, match):
    problem = _linear_problem(2, 1.0)
    with pytest.raises(ValueError, match=match):
        dmft.solve(problem, dmft.MonteCarlo(**kwargs), key=0)


def test_control_variates_need_a_control_pair():
    data = dmft.datasets.sphere(4, 6, 0)
    problem = dmft.Problem(data, dmft.MLP(2, lambda h: jnp.sin(h)), gamma0=1.0, t_max=1.0, n_steps=4)
    with pytest.raises(ValueError, match="control_variates=True needs an activation with a closed-form control pair"):
        dmft.solve(problem, dmft.MonteCarlo(control_variates=True), key=0)


def test_needs_a_key():
    with pytest.raises(ValueError, match="pass key="):
        dmft.solve(_linear_problem(2, 1.0), dmft.MonteCarlo())
