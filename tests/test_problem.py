import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmft


def _X(P=4, D=3):
    return np.random.default_rng(0).normal(size=(P, D))


def test_dataset_properties():
    data = dmft.Dataset(_X(), np.ones(4), _X(2), np.zeros(2))
    assert (data.P, data.P_test, data.D) == (4, 2, 3)
    assert data.X_all.shape == (6, 3) and data.Kx.shape == (6, 6)
    np.testing.assert_allclose(data.Kx, data.X_all @ data.X_all.T / 3)
    assert dmft.Dataset(_X(), np.ones((4, 1))).y.shape == (4,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(X=np.ones(4), y=np.ones(4)), r"X must have shape \(P, D\)"),
        (dict(X=_X(), y=np.ones(3)), r"y must have shape \(4,\)"),
        (dict(X=np.where(np.eye(4, 3), np.nan, 1.0), y=np.ones(4)), "X contains NaN"),
        (dict(X=_X(), y=np.array([1, np.inf, 0, 0])), "y contains NaN"),
        (dict(X=_X(), y=np.ones(4), X_test=_X(2, 5)), "same dimension D"),
        (dict(X=_X(), y=np.ones(4), y_test=np.ones(2)), "y_test was given without X_test"),
        (dict(X=_X(), y=np.ones(4), X_test=_X(2), y_test=np.ones(3)), r"y_test must have shape \(2,\)"),
    ],
)
def test_dataset_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dmft.Dataset(**kwargs)


@pytest.mark.parametrize("depth", [0, 1.5, True, "2"])
def test_mlp_validation(depth):
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        dmft.MLP(depth)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma0=-0.1), "gamma0 must be a finite scalar >= 0"),
        (dict(gamma0=np.nan), "gamma0 must be a finite scalar"),
        (dict(t_max=0.0), "t_max must be a finite scalar > 0"),
        (dict(eta0=-1.0), "eta0 must be a finite scalar > 0"),
        (dict(n_steps=0), "n_steps must be an integer >= 1"),
        (dict(n_steps=10.0), "n_steps must be an integer >= 1"),
    ],
)
def test_problem_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dmft.Problem(dmft.Dataset(_X(), np.ones(4)), dmft.MLP(1), **kwargs)


def test_problem_type_checks():
    with pytest.raises(ValueError, match="data must be a dmft.Dataset"):
        dmft.Problem(_X(), dmft.MLP(1))
    with pytest.raises(ValueError, match="net must be a dmft.MLP"):
        dmft.Problem(dmft.Dataset(_X(), np.ones(4)), "relu")


def test_problem_grid_and_vmap_over_gamma0():
    problem = dmft.Problem(dmft.Dataset(_X(), np.ones(4)), dmft.MLP(2), t_max=2.0, n_steps=4)
    np.testing.assert_allclose(problem.ts, [0, 0.5, 1.0, 1.5, 2.0])
    # gamma0 is a traced leaf: a vmap over it needs no re-validation and no recompilation.
    gammas = jnp.array([0.1, 0.5, 1.0])
    out = jax.vmap(lambda g: dmft.Problem(problem.data, problem.net, gamma0=g).gamma0 * 2)(gammas)
    np.testing.assert_allclose(out, 2 * gammas)


def test_solve_argument_checks():
    problem = dmft.Problem(dmft.Dataset(_X(), np.ones(4)), dmft.MLP(1))
    with pytest.raises(ValueError, match="problem must be a dmft.Problem"):
        dmft.solve("problem", dmft.Lazy())
    with pytest.raises(ValueError, match="solver must be a dmft solver"):
        dmft.solve(problem, "lazy")


def test_sphere_dataset():
    data = dmft.datasets.sphere(10, 7, 0, P_test=4)
    assert (data.P, data.P_test, data.D) == (10, 4, 7)
    np.testing.assert_allclose(np.diag(data.Kx), 1.0, rtol=1e-12)  # |x|^2 = D
    np.testing.assert_allclose([np.mean(data.y), np.std(data.y)], [0.0, 1.0], atol=1e-12)
    noise = dmft.datasets.sphere(10, 7, 1, target="noise")
    assert noise.X_test is None
    with pytest.raises(ValueError, match="target must be 'teacher', 'noise' or 'sign'"):
        dmft.datasets.sphere(10, 7, 0, target="labels")


def test_digits_dataset():
    pytest.importorskip("sklearn")
    data = dmft.datasets.digits(20, 0, P_test=5)
    assert (data.P, data.P_test, data.D) == (20, 5, 64)
    assert set(np.unique(data.y)) <= {-1.0, 1.0}
    np.testing.assert_allclose(np.diag(data.Kx), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="P \\+ P_test <="):
        dmft.datasets.digits(1000, 0)


def test_weight_and_bias_variances_are_checked():
    net = dmft.MLP(2, "relu", sigma_w=1.5, sigma_b=0.2)
    assert float(net.sw2) == 2.25 and float(net.preactivation_kernel(1.0)) == 2.25 + 0.04
    for kwargs, match in (
        (dict(sigma_w=-1.0), "sigma_w must be a finite scalar > 0"),
        (dict(sigma_w=0.0), "sigma_w must be a finite scalar > 0"),
        (dict(sigma_b=-0.1), "sigma_b must be a finite scalar >= 0"),
        (dict(sigma_b=np.inf), "sigma_b must be a finite scalar"),
    ):
        with pytest.raises(ValueError, match=match):
            dmft.MLP(2, "relu", **kwargs)
