import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import stats

import dmft
from dmft.networks.train import _fields, _measure


def _problem(L=2, act="relu", gamma0=1.0, P=6, P_test=2, t_max=4.0, n_steps=20, seed=0, sigmas=(1.0, 0.0)):
    data = dmft.datasets.sphere(P, 10, seed, P_test=P_test)
    net = dmft.MLP(L, act, sigma_w=sigmas[0], sigma_b=sigmas[1])
    return dmft.Problem(data, net, gamma0=gamma0, t_max=t_max, n_steps=n_steps)


BIASED = (1.3, 0.4)  # sigma_w, sigma_b of the tests with weight and bias variances


def _with_outputs(data, loss, C):
    """`data` with C = 3 targets per point: normal (MSE) or one-hot labels of a random linear teacher
    (cross-entropy); unchanged for C = 1."""
    if C == 1:
        return data
    X = data.X_all
    if loss == "mse":
        Y = jr.normal(jr.key(5), (X.shape[0], C))
    else:
        Y = dmft.datasets.one_hot(np.asarray(jnp.argmax(X @ jr.normal(jr.key(6), (X.shape[1], C)), 1)), C)
    return dmft.Dataset(data.X, Y[: data.P], data.X_test, Y[data.P :])


def _seeds(problem, width, n, method="gd", **kw):
    return jax.vmap(lambda k: dmft.networks.train(problem, width, k, method=method, **kw))(jr.split(jr.key(1), n))


@pytest.mark.parametrize("sigmas, C", [((1.0, 0.0), 1), (BIASED, 1), (BIASED, 3)])
def test_ntk_formula_matches_autodiff(sigmas, C):
    # K = sum_l G^{l+1} * Phi~^l (THEORY 2, 11, 12) is the Gram matrix gamma0^2 N grad f . grad f over all
    # weights and biases; with C outputs over the (point, class) pairs.
    problem = _problem(L=3, act="erf", gamma0=0.7, sigmas=sigmas)
    problem = dmft.Problem(_with_outputs(problem.data, "mse", C), problem.net, gamma0=0.7, t_max=4.0, n_steps=20)
    params = dmft.networks.init_params(problem, 32, jr.key(0))
    jac = jax.jacobian(lambda th: dmft.networks.forward(problem, th, problem.data.X_all))(params)
    J = jnp.concatenate([j.reshape(problem.data.Kx.shape[0] * C, -1) for j in jac], axis=1)
    _, K, _, _ = _measure(problem, *_fields(problem, params, 0.0))
    np.testing.assert_allclose(K, 0.7**2 * 32 * J @ J.T, atol=1e-12)


@pytest.mark.parametrize(
    "act, L, sigmas", [(a, L, (1.0, 0.0)) for a in ("relu", "erf") for L in (1, 2, 3)] + [("relu", 2, BIASED)]
)
def test_initial_ntk_matches_lazy(act, L, sigmas):
    # The NTK at t = 0 of a random network is an average over N neurons: the seed average converges
    # to the lazy NTK, with a 1/N bias (negligible here) and seed-to-seed spread ~1/sqrt(N).
    # Each entry must lie within 3 standard errors of the seed mean (SE = sd / sqrt(seeds)); entries
    # on one row are correlated, so the tolerance is applied to the worst entry over the whole matrix
    # with 3.5 SE allowed for the ~P^2/2 = 30 distinct entries (Bonferroni at ~1%).
    problem = _problem(L, act, n_steps=1, t_max=0.1, sigmas=sigmas)
    runs = _seeds(problem, 256, 16)
    K0 = np.asarray(runs.ntk[:, 0])
    mean, se = K0.mean(0), K0.std(0, ddof=1) / np.sqrt(16)
    lazy = np.asarray(dmft.solve(problem, dmft.Lazy()).ntk[0])
    z = np.abs(mean - lazy) / se
    print(f"{act} L={L}: max z = {z.max():.2f}")
    assert z.max() < 3.5


def _lazy_tracking_error(width):
    problem = _problem(L=2, act="relu", gamma0=0.01, t_max=8.0, n_steps=16)
    runs = _seeds(problem, width, 4, method="flow")
    lazy = dmft.solve(problem, dmft.Lazy())
    return np.max(np.abs(np.asarray(runs.loss).mean(0) - np.asarray(lazy.loss))) / float(lazy.loss[0])


# gamma0 = 0.01: features move by O(gamma0^2) = 1e-4, so a centred network follows the lazy gradient
# flow up to its random-kernel fluctuation (O(1/sqrt N) per network) and, since the loss is convex in
# the kernel, an O(1/N) bias of the seed mean. Measured seed-mean errors (4 seeds): 2.4%, 1.4%,
# 0.86% of L(0) at N = 1024, 2048, 4096.
@pytest.mark.slow
def test_small_gamma0_approaches_lazy_with_width():
    errs = [_lazy_tracking_error(N) for N in (512, 2048)]
    print("seed-mean |loss - lazy| / loss(0):", errs)
    assert errs[1] < errs[0]


@pytest.mark.slow
def test_small_gamma0_wide_network_tracks_lazy_within_one_percent():
    err = _lazy_tracking_error(4096)
    print(f"N = 4096: {err:.4f} of loss(0)")
    assert err < 0.01


@pytest.mark.slow
def test_rich_two_layer_relu_ntk_moves_and_widths_converge():
    # gamma0 = 1: the NTK moves by O(1) (a lazy network's moves by O(gamma0^2) -> 0); consecutive
    # widths agree ever more closely, since seed-averaged curves approach the N -> inf limit at rate
    # ~1/N (centred) or 1/sqrt(N).
    problem = _problem(L=1, act="relu", gamma0=1.0, t_max=6.0, n_steps=30, P_test=0)
    widths, curves = [128, 512, 2048], []
    for N in widths:
        runs = _seeds(problem, N, 8)
        move = np.linalg.norm(runs.ntk[:, -1] - runs.ntk[:, 0], axis=(1, 2)) / np.linalg.norm(
            runs.ntk[:, 0], axis=(1, 2)
        )
        assert np.mean(move) > 0.1
        curves.append((np.asarray(runs.loss.mean(0)), np.asarray(runs.ntk.mean(0))))
    d_loss = [np.max(np.abs(a[0] - b[0])) for a, b in zip(curves, curves[1:])]
    d_ntk = [np.max(np.abs(a[1] - b[1])) for a, b in zip(curves, curves[1:])]
    print("consecutive-width differences: loss", d_loss, "ntk", d_ntk)
    assert d_loss[1] < d_loss[0] and d_ntk[1] < d_ntk[0]


@pytest.mark.slow
def test_rich_two_layer_relu_widths_to_4096():
    # The noise of a seed mean is ~ sd / sqrt(seeds) ~ 1 / sqrt(N seeds); with 8 seeds the loss
    # differences between consecutive widths (~1e-3) were noise-dominated (0.0013 then 0.0036), so
    # 32 seeds (depth 1 is cheap: no N x N matrix).
    problem = _problem(L=1, act="relu", gamma0=1.0, t_max=6.0, n_steps=30, P_test=0)
    curves = []
    for N in (256, 1024, 4096):
        runs = _seeds(problem, N, 32)
        curves.append((np.asarray(runs.loss.mean(0)), np.asarray(runs.ntk.mean(0))))
    d_loss = [np.max(np.abs(a[0] - b[0])) for a, b in zip(curves, curves[1:])]
    d_ntk = [np.max(np.abs(a[1] - b[1])) for a, b in zip(curves, curves[1:])]
    print("256->1024->4096 differences: loss", d_loss, "ntk", d_ntk)
    assert d_loss[1] < d_loss[0] and d_ntk[1] < d_ntk[0]


@pytest.mark.slow
def test_gd_converges_to_flow_at_first_order():
    # Discrete GD with step eta0 dt differs from gradient flow by O(dt) (Euler's local error dt^2).
    problem = _problem(L=2, act="tanh", t_max=3.0, n_steps=8, P_test=0)
    flow = dmft.networks.train(problem, 128, jr.key(0), method="flow", rtol=1e-8, atol=1e-10)
    dts, errs = [], []
    for n in (8, 16, 32, 64):
        fine = _problem(L=2, act="tanh", t_max=3.0, n_steps=n, P_test=0)
        gd = dmft.networks.train(fine, 128, jr.key(0), method="gd")
        dts.append(3.0 / n)
        errs.append(abs(float(gd.loss[-1]) - float(flow.loss[-1])))
    slope = stats.linregress(np.log(dts), np.log(errs)).slope
    assert abs(slope - 1) < 0.2


@pytest.mark.slow
def test_vmap_equals_loop_and_shapes():
    problem = _problem(L=2, act="tanh", n_steps=5)
    keys = jr.split(jr.key(0), 3)
    batched = jax.vmap(lambda k: dmft.networks.train(problem, 16, k, method="gd"))(keys)
    for i, k in enumerate(keys):
        np.testing.assert_allclose(batched.loss[i], dmft.networks.train(problem, 16, k, method="gd").loss, atol=1e-12)
    run = dmft.networks.train(problem, 16, 0)
    assert run.f.shape == (6, 6) and run.ntk.shape == (6, 6, 6) and run.f_test.shape == (6, 2)
    assert run.ntk_test.shape == (6, 2, 6) and run.Phi_eq.shape == run.G_eq.shape == (2, 6, 8, 8)
    assert run.h_last.shape == (2, 8, 16)
    np.testing.assert_allclose(run.f[0], 0.0, atol=1e-12)  # centred
    no_test = dmft.networks.train(_problem(P_test=0, n_steps=3), 8, 0, method="gd")
    assert no_test.f_test is None and no_test.loss_test is None


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(width=0), "width must be an integer >= 1"), (dict(method="adam"), "method must be one of")],
)
def test_bad_arguments(kwargs, match):
    args = dict(width=8, method="gd") | kwargs
    with pytest.raises(ValueError, match=match):
        dmft.networks.train(_problem(), args.pop("width"), 0, **args)


@pytest.mark.parametrize(
    "L, act, sigmas, loss, C", [(2, "tanh", (1.0, 0.0), "mse", 1), (2, "relu", BIASED, "cross_entropy", 3)]
)
def test_lazy_networks_are_the_limit_of_small_gamma0(L, act, sigmas, loss, C):
    # At fixed width a network's parameters move by O(gamma0), so its predictions, NTK and kernels
    # differ from the gamma0 = 0 network's (static empirical NTK) by c gamma0 + O(gamma0^2): at gamma0 =
    # 1e-4 (c measured 0.03-4.8 over these fields: below 1e-3) and twice that the differences double, up
    # to the O(gamma0^2) term's relative 1e-4 and float64 round-off amplified by 1 / gamma0 in the
    # centred read-out (~1e-12 / 1e-4); measured ratios 2 +- 0.001.
    base = _problem(L, act, t_max=3.0, n_steps=10, sigmas=sigmas)
    data = _with_outputs(base.data, loss, C)
    problem = lambda g: dmft.Problem(data, base.net, gamma0=g, t_max=3.0, n_steps=10, loss=loss)
    runs = [dmft.networks.train(problem(g), 64, 3, method="gd") for g in (0.0, 1e-4, 2e-4)]
    for name in ("f", "f_test", "ntk", "ntk_test", "loss", "G_eq", "Phi_eq"):
        lazy, small, double = (np.asarray(getattr(r, name)) for r in runs)
        d1, d2 = np.max(np.abs(small - lazy)), np.max(np.abs(double - lazy))
        assert d1 < 1e-3 and abs(d2 / d1 - 2) < 0.01, (name, d1, d2)
    assert np.all(np.asarray(runs[0].ntk) == np.asarray(runs[0].ntk)[0])  # static


def test_lazy_networks_flow_and_ensemble():
    # By gradient flow the gamma0 = 0 network integrates df/dt = (eta0 / P) K_N Delta to ~1e-10; GD's
    # Euler steps approach it at first order in dt (doubling the steps halves the gap: ratio 2 up to the
    # O(dt^2) term, measured 2.009 at 20 -> 40 steps and 2.004 at 40 -> 80). A vmapped ensemble gives each
    # seed's network.
    problem = lambda n: _problem(2, "tanh", gamma0=0.0, t_max=3.0, n_steps=n)
    flow = dmft.networks.train(problem(20), 64, 3, method="flow")
    gaps = []
    for n in (20, 40):
        gd = dmft.networks.train(problem(n), 64, 3, method="gd")
        gaps.append(np.max(np.abs(np.asarray(gd.loss)[:: n // 20] - np.asarray(flow.loss))))
    assert abs(gaps[0] / gaps[1] - 2) < 0.2, gaps
    keys = jr.split(jr.key(1), 4)
    runs = dmft.networks.ensemble(problem(20), 64, keys, method="flow")
    np.testing.assert_allclose(runs.f[3], dmft.networks.train(problem(20), 64, keys[3], method="flow").f, rtol=1e-9)
    with pytest.raises(ValueError, match="must be centred"):
        dmft.networks.train(problem(20), 8, 0, center=False)


@pytest.mark.parametrize(
    "L, act, sigmas, loss, C",
    [(1, "relu", BIASED, "mse", 1), (2, "tanh", (1.0, 0.0), "mse", 1), (3, "relu", BIASED, "mse", 1)]
    + [(1, "relu", (1.0, 0.0), "logistic", 1), (3, "tanh", (1.0, 0.0), "logistic", 1)]
    + [(1, "erf", BIASED, "mse", 3), (3, "erf", BIASED, "cross_entropy", 3)],
)
def test_gd_step_from_fields_equals_autodiff(L, act, sigmas, loss, C):
    # The GD update is written from the measured fields (g = gamma0 N df/dh) and the error signal
    # Delta = -dl/df; it must be the step theta - eta0 dt gamma0^2 N grad Loss of jax.grad, to round-off.
    from dmft.networks.train import _gd_update, _loss, forward, init_params

    net = dmft.MLP(L, act, sigma_w=sigmas[0], sigma_b=sigmas[1])
    data = dmft.datasets.sphere(5, 4, 0, P_test=2, target="sign" if loss == "logistic" else "teacher")
    problem = dmft.Problem(_with_outputs(data, loss, C), net, gamma0=1.3, n_steps=4, loss=loss)
    params = init_params(problem, 32, jr.key(1))
    params = _gd_update(problem, params, *_fields(problem, params, 0.0))  # away from the symmetric start
    f0 = forward(problem, params, problem.data.X_all)
    step = problem.eta0 * problem.dt * problem.gamma0**2 * 32
    expected = jax.tree.map(lambda x, g: x - step * g, params, jax.grad(_loss(problem, f0[:5]))(params))
    got = _gd_update(problem, params, *_fields(problem, params, f0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_ensemble_trains_in_batches_within_its_memory_budget():
    problem, keys = _problem(L=2, act="tanh", n_steps=5), jr.split(jr.key(2), 5)
    one = dmft.networks.ensemble_bytes(problem, 16, 1, "gd")
    whole = dmft.networks.ensemble(problem, 16, keys, mesh=1, method="gd")
    # Batches of 2 seeds (and a last one of 1): the same networks, to rounding. The weights are drawn in
    # float32, whose transcendental functions XLA's CPU emitters may round differently inside a loop than
    # outside it (1 ulp, 6e-8, with the default suite's `conftest.py` flags; none with XLA's defaults). An
    # ulp of the weights moves the 5-step losses and fields by about as much; a seed trained in another's
    # place would move them by O(1).
    batched = dmft.networks.ensemble(problem, 16, keys, mesh=1, method="gd", memory=2.5 * one)
    np.testing.assert_allclose(batched.loss, whole.loss, rtol=1e-6)
    np.testing.assert_allclose(batched.h_last, whole.h_last, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one network of width 16 .* needs"):
        dmft.networks.ensemble(problem, 16, keys, mesh=1, method="gd", memory=0.5 * one)
