import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import dmft


def _problem(L=2, gamma0=1.0, P=6, D=8, P_test=2, t_max=3.0, n_steps=30, seed=0, sigmas=(1.0, 0.0)):
    data = dmft.datasets.sphere(P, D, seed, P_test=P_test)
    net = dmft.MLP(L, "linear", sigma_w=sigmas[0], sigma_b=sigmas[1])
    return dmft.Problem(data, net, gamma0=gamma0, t_max=t_max, n_steps=n_steps)


def _slope(x, y):
    return stats.linregress(np.log(x), np.log(y)).slope


@pytest.mark.parametrize(
    "L, sigmas",
    [(1, (1.0, 0.0)), (2, (1.0, 0.0)), pytest.param(3, (1.0, 0.0), marks=pytest.mark.slow), (3, (0.9, 0.4))],
)
def test_small_gamma0_deviation_from_lazy_is_order_gamma0_squared(L, sigmas):
    # Kernel changes are even in gamma0 (THEORY 9): |DMFT - Lazy(discrete)| = c gamma0^2 + O(gamma0^4),
    # so over [0.01, 0.1] the log-log slope is 2 up to a relative O(gamma0^2) <= 1% curvature. With
    # weight and bias variances the lazy limit is the independent recursion of `lazy_kernels`.
    gammas = np.geomspace(0.01, 0.1, 5)
    lazy = dmft.solve(_problem(L, sigmas=sigmas), dmft.Lazy(discrete=True))
    dev_loss, dev_ntk = [], []
    for g in gammas:
        sol = dmft.solve(_problem(L, gamma0=g, sigmas=sigmas), dmft.LinearClosure())
        dev_loss.append(np.max(np.abs(sol.loss - lazy.loss)))
        dev_ntk.append(np.max(np.abs(sol.ntk - lazy.ntk)))
    assert abs(_slope(gammas, dev_loss) - 2) < 0.2
    assert abs(_slope(gammas, dev_ntk) - 2) < 0.2


@pytest.mark.slow
def test_converged_solve_is_a_fixed_point():
    problem = _problem(L=3, gamma0=1.2)
    solver = dmft.LinearClosure(rtol=1e-13, max_iters=400)
    sol = dmft.solve(problem, solver)
    assert sol.result == dmft.RESULTS.successful
    # Re-run the iteration state to convergence and apply the map once more: the relative change of
    # every order parameter must be at the float64 round-off level, far below 1e-10.
    state = solver.init(problem, None)
    for _ in range(int(sol.iterations)):
        state = solver.step(problem, state, None)
    again = solver.step(problem, state, None)
    import jax

    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state)):
        if a.size:
            assert np.linalg.norm(a - b) <= 1e-10 * np.linalg.norm(a)


@pytest.mark.slow
def test_dt_convergence_is_first_order():
    # The left-point rule is first order: error(dt) = c1 dt + c2 dt^2. Reference: Richardson
    # extrapolation 2 x(dt_min) - x(2 dt_min) (removes the O(dt) term). The grids are fine enough
    # (dt <= 0.15) that the dt^2 term bends the fitted slope by less than 0.2.
    finals, steps = [], [20, 40, 80, 160, 320]
    for n in steps:
        finals.append(float(dmft.solve(_problem(L=2, gamma0=1.0, n_steps=n), dmft.LinearClosure()).loss[-1]))
    ref = 2 * finals[-1] - finals[-2]
    errors = np.abs(np.array(finals[:-1]) - ref)
    dts = 3.0 / np.array(steps[:-1])
    assert abs(_slope(dts, errors) - 1) < 0.2


def test_two_layer_whitened_closed_form():
    # THEORY 6: L = 1, Kx = I, |y| given: d delta/dt = -(2 eta0/P) sqrt(1 + gamma0^2 (|y| - delta)^2) delta.
    # The Euler closure converges to it at first order in dt.
    P, gamma0, t_max = 4, 2.0, 6.0
    X = np.sqrt(P) * np.eye(P)  # |x|^2 = D = P and orthogonal: Kx = I
    y = np.array([1.0, -0.5, 0.8, 0.3])
    ynorm = np.linalg.norm(y)
    ode = integrate.solve_ivp(
        lambda t, d: -2 / P * np.sqrt(1 + gamma0**2 * (ynorm - d) ** 2) * d,
        (0, t_max),
        [ynorm],
        rtol=1e-12,
        atol=1e-14,
        dense_output=True,
    )
    errs = []
    for n in (50, 100, 200):
        problem = dmft.Problem(dmft.Dataset(X, y), dmft.MLP(1, "linear"), gamma0=gamma0, t_max=t_max, n_steps=n)
        sol = dmft.solve(problem, dmft.LinearClosure())
        delta = np.linalg.norm(y - np.asarray(sol.f), axis=1)
        errs.append(np.max(np.abs(delta - ode.sol(np.asarray(sol.ts))[0])))
    assert errs[-1] < 0.01 * ynorm
    assert abs(_slope([50, 100, 200], errs) + 1) < 0.2  # error ~ dt


@pytest.mark.slow
def test_perturbation_theory_ntk_correction():
    # PAPER_NOTES 9.3 (checked there against the exact closure): for deep linear networks
    # K2(t) = (L+1)^2 L (L+2)/6 [Kx v v^T Kx + (v^T Kx v) Kx], v(t) = (eta0/P) int_0^t Delta_lazy.
    # The continuous-time formula with the discrete v differs from the closure's (K(g) - K(0))/g^2 by
    # O(g^2) (next order) + O(dt) (time discretisation): with g = 0.02 and dt = 0.01 both are ~1e-3 of
    # K2, so 2% relative agreement is a safe bound.
    for L in (1, 2, 3):
        problem = _problem(L, gamma0=0.02, P_test=0, t_max=2.0, n_steps=200)
        sol = dmft.solve(problem, dmft.LinearClosure())
        lazy = dmft.solve(problem, dmft.Lazy(discrete=True))
        Kx, y = np.asarray(problem.data.Kx), np.asarray(problem.data.y)
        Delta0 = y - np.asarray(lazy.f)
        v = np.concatenate([np.zeros((1, len(y))), np.cumsum(Delta0[:-1], axis=0)]) * float(problem.dt) / len(y)
        Kv = v @ Kx
        K2 = (
            (L + 1) ** 2
            * L
            * (L + 2)
            / 6
            * (np.einsum("ti,tj->tij", Kv, Kv) + np.einsum("ti,ti->t", v, Kv)[:, None, None] * Kx)
        )
        K2_closure = (np.asarray(sol.ntk) - np.asarray(lazy.ntk)) / 0.02**2
        assert np.linalg.norm(K2_closure - K2) <= 0.02 * np.linalg.norm(K2)


@pytest.mark.slow
def test_symmetry_causality_and_shapes():
    # dt = 0.075: small enough that explicit Euler stays stable as the NTK grows (dt eta0 lambda_max / P < 2).
    problem = _problem(L=3, gamma0=1.5, P=5, P_test=2, n_steps=40)
    sol = dmft.solve(problem, dmft.LinearClosure())
    T, Pa = 41, 7
    assert sol.Phi.shape == (3, T, Pa, T, Pa) and sol.G.shape == (3, T, 1, T, 1)
    assert sol.A.shape == (2, T, Pa, T, 1) and sol.B.shape == (2, T, 1, T, Pa)
    Phi = np.asarray(sol.Phi).reshape(3, T * Pa, T * Pa)
    np.testing.assert_allclose(Phi, np.swapaxes(Phi, 1, 2), atol=1e-12)
    assert np.all(np.linalg.eigvalsh(Phi) > -1e-10)  # covariances are PSD
    upper = np.triu(np.ones((T, T)))  # s >= t
    assert np.all(np.asarray(sol.A)[:, :, :, :, 0] * upper[None, :, None, :] == 0)
    assert np.all(np.asarray(sol.B)[:, :, 0, :, :] * upper[None, :, :, None] == 0)
    np.testing.assert_allclose(sol.Phi_eq[:, :, :5, :5], np.einsum("ltmtn->ltmn", np.asarray(sol.Phi))[:, :, :5, :5])
    assert np.all(np.diff(np.asarray(sol.loss)) < 0)


@pytest.mark.slow
def test_vmap_over_gamma0():
    problem = _problem(L=2)
    gammas = jnp.array([0.5, 1.0])
    solve_at = lambda g: dmft.solve(eqx.tree_at(lambda p: p.gamma0, problem, g), dmft.LinearClosure(), throw=False)
    import jax

    batched = jax.vmap(solve_at)(gammas)
    for i, g in enumerate(gammas):
        np.testing.assert_allclose(batched.loss[i], solve_at(g).loss, atol=1e-9)


def test_rejects_nonlinear_and_bad_settings():
    data = dmft.datasets.sphere(4, 3, 0)
    with pytest.raises(ValueError, match="use dmft.MonteCarlo"):
        dmft.solve(dmft.Problem(data, dmft.MLP(2, "relu")), dmft.LinearClosure())
    with pytest.raises(ValueError, match="damping must be in"):
        dmft.solve(_problem(), dmft.LinearClosure(damping=0.0))


def test_nonconvergence_is_reported():
    # From the lazy start the iteration needs tens of sweeps at gamma0 = 1.5, so two are not enough.
    solver = dmft.LinearClosure(max_iters=2, start="lazy")
    sol = dmft.solve(_problem(L=3, gamma0=1.5), solver, throw=False)
    assert sol.result == dmft.RESULTS.max_iters_reached and sol.iterations == 2
    with pytest.raises(Exception, match="did not reach rtol"):
        dmft.solve(_problem(L=3, gamma0=1.5), solver)
    with pytest.raises(ValueError, match="start must be"):
        dmft.solve(_problem(), dmft.LinearClosure(start="warm"))


@pytest.mark.parametrize(
    "L, responses, sigmas",
    [(1, True, (1.0, 0.0)), (2, True, (1.0, 0.0))]
    + [
        pytest.param(3, r, s, marks=pytest.mark.slow)
        for r, s in ((True, (1.0, 0.0)), (False, (1.0, 0.0)), (True, (0.9, 0.4)))
    ],
)
def test_causal_march_is_the_fixed_point_of_the_iteration(L, responses, sigmas):
    # The one-pass causal solution must be the fixed point the damped Jacobi iteration converges to
    # from the lazy start: both are exact solutions of the same closure, so they agree to round-off
    # amplified by the iteration's conditioning (measured ~1e-14; 1e-11 leaves three decades). Damped
    # at 0.5: undamped, the read-out rule's iteration diverges from the lazy start at depth 3 with
    # sigma_w = 0.9, sigma_b = 0.4 (`test_a_diverging_iteration_says_so`).
    problem = _problem(L=L, gamma0=1.5, sigmas=sigmas)
    marched = dmft.solve(problem, dmft.LinearClosure(responses=responses, rtol=1e-13))
    iterated = dmft.solve(
        problem, dmft.LinearClosure(responses=responses, rtol=1e-13, max_iters=400, start="lazy", damping=0.5)
    )
    # The march is already converged: the first sweep changes nothing beyond round-off.
    assert int(marched.iterations) == 1 and float(marched.residuals[0]) < 1e-13
    assert int(iterated.iterations) > 5
    for name in ("loss", "ntk", "ntk_test", "Phi", "G", "A", "B"):
        a, b = np.asarray(getattr(marched, name)), np.asarray(getattr(iterated, name))
        if b.size == 0:  # no response functions at depth 1
            continue
        assert np.max(np.abs(a - b)) <= 1e-11 * max(np.max(np.abs(b)), 1.0), name


def test_a_diverging_iteration_says_so():
    # From the lazy start the undamped iteration of this closure grows to ~1e213 in 7 iterations: its
    # relative change goes non-finite before the state does, and the solve must say it went
    # non-finite, not that it ran out of iterations.
    problem = _problem(L=3, gamma0=1.5, sigmas=(0.9, 0.4))
    sol = dmft.solve(problem, dmft.LinearClosure(start="lazy", max_iters=400), throw=False)
    assert sol.result == dmft.RESULTS.nonfinite and int(sol.iterations) < 20
