"""Several outputs (THEORY 12, docs/theory_extensions.md): targets y (P, C), the cross-entropy loss,
class-resolved gradient kernels, and the networks with a C-vector read-out."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import dmft

C = 3


def _data(P=6, P_test=3, D=8, loss="mse", key=0):
    """Inputs on the sphere with C outputs: normal targets (mse) or one-hot labels of a random linear
    teacher (cross_entropy)."""
    base = dmft.datasets.sphere(P, D, key, P_test=P_test)
    X = base.X_all
    if loss == "mse":
        Y = jr.normal(jr.key(5), (P + P_test, C))
    else:
        Y = dmft.datasets.one_hot(np.asarray(jnp.argmax(X @ jr.normal(jr.key(6), (D, C)), axis=1)), C)
    return dmft.Dataset(X[:P], Y[:P], X[P:], Y[P:])


def _problem(depth, act, loss="mse", gamma0=1.0, n_steps=8, t_max=2.0, sigmas=(1.1, 0.2), **kw):
    net = dmft.MLP(depth, act, sigma_w=sigmas[0], sigma_b=sigmas[1])
    return dmft.Problem(_data(loss=loss, **kw), net, gamma0=gamma0, t_max=t_max, n_steps=n_steps, loss=loss)


def test_shapes_follow_the_targets():
    problem = _problem(2, "linear")
    sol = dmft.solve(problem, dmft.LinearClosure())
    n1, P, Pa = 9, 6, 9
    assert sol.f.shape == (n1, P, C) and sol.f_test.shape == (n1, 3, C)
    assert sol.ntk.shape == (n1, P, C, P, C) and sol.ntk_test.shape == (n1, 3, C, P, C)
    assert sol.G_eq.shape == (2, n1, Pa, C, Pa, C) and sol.Phi_eq.shape == (2, n1, Pa, Pa)
    assert sol.G.shape == (2, n1, 1, C, n1, 1, C) and sol.Phi.shape == (2, n1, Pa, n1, Pa)
    run = dmft.networks.train(problem, 16, 0, method="gd")
    assert run.f.shape == sol.f.shape and run.ntk.shape == sol.ntk.shape and run.G_eq.shape == sol.G_eq.shape


def test_depth_3_monte_carlo_with_classes_runs():
    # Regression: the NTK's sum over the hidden layers, vmapped over the replicas (float32 for tanh in
    # either precision), crashed XLA's CPU runtime at depth 3 with several classes
    # (`dynamics.ntk_from_kernels`). And at 32 samples per replica the replicas' first-order square
    # roots overshoot their covariances so far that, unguarded, they ran away on keys 0 and 2 of these.
    problem, solver = _problem(3, "tanh", n_steps=4), dmft.MonteCarlo(n_samples=256)
    for key in range(4):
        sol = dmft.solve(problem, solver, key=key)
        assert sol.f.shape == (5, 6, C) and bool(jnp.all(jnp.isfinite(sol.ntk)))
        assert bool(jnp.all(jnp.isfinite(sol.stderr["loss"])))


def test_lazy_limit_is_the_scalar_solution_per_output():
    # At gamma0 -> 0 the NTK is shared by the outputs, K (x) I_C: each output follows its own scalar
    # gradient flow (the MSE closed form), exactly.
    problem = _problem(2, "relu")
    sol = dmft.solve(problem, dmft.Lazy())
    data = problem.data
    for c in range(C):
        scalar = dmft.Problem(
            dmft.Dataset(data.X, data.y[:, c], data.X_test, data.y_test[:, c]), problem.net, t_max=2.0, n_steps=8
        )
        ref = dmft.solve(scalar, dmft.Lazy())
        np.testing.assert_allclose(sol.f[..., c], ref.f, atol=1e-12)
        np.testing.assert_allclose(sol.f_test[..., c], ref.f_test, atol=1e-12)
        for d in range(C):
            np.testing.assert_allclose(sol.ntk[:, :, c, :, d], ref.ntk * (c == d), atol=1e-12)


@pytest.mark.parametrize("depth", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_closure_march_is_the_fixed_point_of_the_iteration(depth):
    # The causal march and the damped iteration from the lazy kernels solve the same closure; with
    # classes the march advances C rows (one per class) per time step.
    problem = _problem(depth, "linear", loss="cross_entropy")
    march = dmft.solve(problem, dmft.LinearClosure())
    iterated = dmft.solve(problem, dmft.LinearClosure(start="lazy"))
    assert march.iterations == 1
    for name in ("f", "ntk", "G_eq", "Phi_eq"):
        np.testing.assert_allclose(getattr(march, name), getattr(iterated, name), atol=1e-10)


@pytest.mark.parametrize("loss", ["mse", pytest.param("cross_entropy", marks=pytest.mark.slow)])
def test_monte_carlo_with_a_linear_activation_matches_the_closure(loss):
    # Two independent implementations of the class-resolved DMFT: the Monte Carlo single site (class
    # index on r, z, g) and the closure's (time, class) algebra. Depth 1 has no responses, so the
    # Monte Carlo answer is unbiased up to its O(T Pa / S) feedback; every train prediction must lie
    # within 4 standard errors (Bonferroni over the ~50 entries at ~1%). f(1) = c K(0) Delta(0) is exact
    # (lazy kernels, whose control variates cancel the noise): compared from t = 2 on.
    problem = _problem(1, "linear", loss=loss)
    exact = dmft.solve(problem, dmft.LinearClosure())
    mc = dmft.solve(problem, dmft.MonteCarlo(n_samples=4096), key=0)
    z = np.abs(mc.f - exact.f)[2:] / mc.stderr["f"][2:]
    print(f"{loss}: max |z| = {z.max():.2f}")
    assert z.max() < 4.0


def test_perturbative_linear_is_second_order():
    # Perturbative on a linear network differs from the closure at O(gamma0^4): halving gamma0 divides
    # the error by ~16 (a ratio above 8 rules out a missing O(gamma0^2) term, e.g. in the class blocks).
    errors = []
    for g in (0.2, 0.1):
        problem = _problem(2, "linear", gamma0=g)
        pert = dmft.solve(problem, dmft.Perturbative())
        # Both with the Euler rule: perturbation theory expands the Euler-discretised equations.
        exact = dmft.solve(problem, dmft.LinearClosure(predictions="euler"))
        errors.append(float(jnp.max(jnp.abs(pert.f - exact.f))))
    print("errors", errors)
    assert errors[0] / errors[1] > 8


def test_cross_entropy_loss_and_accuracy():
    loss = dmft.losses.CrossEntropy()
    y = dmft.datasets.one_hot(np.array([0, 2, 1]), 3)
    f = jnp.array([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    expected = np.mean([np.log(np.exp(row).sum()) - row[label] for row, label in zip(np.asarray(f), [0, 2, 1])])
    np.testing.assert_allclose(loss.value(f, y), expected, rtol=1e-12)
    np.testing.assert_allclose(loss.delta(f, y), y - jax.nn.softmax(f, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(loss.accuracy(f, y), 2 / 3)
    np.testing.assert_allclose(jax.grad(lambda f: -f.shape[0] * loss.value(f, y))(f), loss.delta(f, y), atol=1e-12)


def test_bad_inputs_raise():
    data = _data()
    with pytest.raises(ValueError, match="y_test must have shape"):
        dmft.Dataset(data.X, data.y, data.X_test, data.y_test[:, :2])
    with pytest.raises(ValueError, match=r"y must have shape \(6,\) or \(6, C\)"):
        dmft.Dataset(data.X, np.ones((6, 2, 2)))
    with pytest.raises(ValueError, match="labels must lie in"):
        dmft.datasets.one_hot(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="1-d array of integers"):
        dmft.datasets.one_hot(np.array([0.5, 1.0]), 3)
    net = dmft.MLP(1, "tanh")
    with pytest.raises(ValueError, match='loss="logistic" is binary'):
        dmft.Problem(dmft.Dataset(data.X, np.sign(data.y)), net, loss="logistic")
    with pytest.raises(ValueError, match="C >= 2 classes"):
        dmft.Problem(dmft.datasets.sphere(6, 8, 0), net, loss="cross_entropy")
    with pytest.raises(ValueError, match="rows summing to 1"):
        dmft.Problem(data, net, loss="cross_entropy")
    deep = dmft.Problem(data, dmft.MLP(2, "tanh"))
    with pytest.raises(ValueError, match="scalar targets"):
        dmft.field_samples(deep, dmft.solve(deep, dmft.Lazy()), n_samples=8, key=0)


def test_digits_with_three_classes_are_one_hot():
    pytest.importorskip("sklearn")
    data = dmft.datasets.digits(12, 0, P_test=6, classes=(3, 5, 8))
    assert data.y.shape == (12, 3) and data.y_test.shape == (6, 3)
    np.testing.assert_array_equal(data.y.sum(1), 1.0)


# -- against networks (slow) ----------------------------------------------------------------------------


def _network_error(problem, sol, width, seeds=8):
    runs = jax.vmap(lambda k: dmft.networks.train(problem, width, k, method="gd"))(jr.split(jr.key(0), seeds))
    scale = float(sol.loss[0])
    loss_err = float(jnp.max(jnp.abs(runs.loss.mean(0) - sol.loss))) / scale
    loss_se = float(jnp.max(runs.loss.std(0, ddof=1))) / np.sqrt(seeds) / scale
    acc_err = None if sol.accuracy is None else float(jnp.max(jnp.abs(runs.accuracy.mean(0) - sol.accuracy)))
    return loss_err, loss_se, acc_err


@pytest.mark.slow
def test_multi_output_closure_matches_networks():
    # Deep linear networks with C = 3 outputs trained by GD on the DMFT grid (8 seeds): the seed-mean
    # loss approaches the closure. Tolerance from the issue, 2% of the initial loss at N = 4096; the
    # expected error there is the O(dt) gap between GD and the Euler predictions of the discrete DMFT
    # (~0.5% at dt = 0.125, measured) plus 1/sqrt(N) noise over 8 seeds (SE ~0.2%).
    problem = _problem(2, "linear", n_steps=24, t_max=3.0, P=8, sigmas=(1.0, 0.0))
    sol = dmft.solve(problem, dmft.LinearClosure())
    errors = {N: _network_error(problem, sol, N) for N in (1024, 4096)}
    print(errors)
    assert errors[4096][0] < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_cross_entropy_dmft_matches_networks(act):
    # Depth-2 networks with a softmax cross-entropy over 3 classes: MonteCarlo (S = 4096) against the
    # seed mean of GD networks of width 4096 (8 seeds), within the 1% of the initial loss
    # (finite-width noise ~0.3%, O(dt) GD-vs-Euler gap ~0.3%, Monte Carlo SE ~0.1%) and 1 percentage
    # point of train and test accuracy.
    problem = _problem(2, act, loss="cross_entropy", n_steps=20, t_max=4.0, sigmas=(1.0, 0.0))
    sol = dmft.solve(problem, dmft.MonteCarlo(n_samples=4096), key=0)
    loss_err, loss_se, acc_err = _network_error(problem, sol, 4096)
    print(f"{act}: loss error {loss_err:.4f} (SE {loss_se:.4f}), accuracy error {acc_err:.3f}")
    assert loss_err < 0.01 and acc_err <= 0.01
