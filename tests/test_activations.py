import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quadrature import kernel_matrix
from scipy import special

import dmft
from dmft.activations import Elementwise, Erf, ErfSurrogate, Linear, ReLU, Tanh, gauss_hermite_kernels, get_activation

# A generic 3x3 covariance (not normalised, with a near-parallel pair) to exercise every branch.
COV = np.array([[1.3, 0.4, 1.0], [0.4, 0.9, 0.2], [1.0, 0.2, 0.85]])
np.testing.assert_array_less(0, np.linalg.eigvalsh(COV))

SCALAR = {
    "linear": (lambda x: x, lambda x: 1.0, ()),
    "relu": (lambda x: max(x, 0.0), lambda x: 1.0 if x > 0 else 0.0, (0.0,)),
    "erf": (special.erf, lambda x: 2 / np.sqrt(np.pi) * np.exp(-x * x), ()),
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2, ()),
}


@pytest.mark.parametrize("name", ["linear", "relu", "erf", "tanh"])
def test_kernels_match_adaptive_quadrature(name):
    # Closed forms (linear, relu, erf) and Gauss-Hermite (tanh, smooth so spectrally convergent)
    # against scipy adaptive quadrature at epsrel 1e-12: both sides are accurate far below 1e-8.
    fn, dfn, kinks = SCALAR[name]
    phi, dphi = get_activation(name).kernels(jnp.asarray(COV))
    np.testing.assert_allclose(phi, kernel_matrix(fn, fn, COV, kinks), rtol=0, atol=1e-8)
    np.testing.assert_allclose(dphi, kernel_matrix(dfn, dfn, COV, kinks), rtol=0, atol=1e-8)


@pytest.mark.parametrize("act", [Erf(), Linear()])
def test_gauss_hermite_matches_closed_forms_for_smooth_activations(act):
    # The generic quadrature path must agree with the closed forms where phi is smooth (1e-8).
    phi_gh, dphi_gh = gauss_hermite_kernels(act.fn, act.dfn, jnp.asarray(COV))
    phi, dphi = act.kernels(jnp.asarray(COV))
    np.testing.assert_allclose(phi_gh, phi, atol=1e-8)
    np.testing.assert_allclose(dphi_gh, dphi, atol=1e-8)


def test_control_pairs():
    # Monte Carlo control variates need the exact means of their (fn, dfn) pair: closed forms for the
    # activations that have them (their own pair), and for tanh's fitted erf / Gaussian pair, checked
    # against adaptive quadrature like the closed forms above (1e-8). A custom callable has none.
    for act in (Linear(), ReLU(), Erf()):
        assert act.control() is act
    ctrl = Tanh().control()
    assert isinstance(ctrl, ErfSurrogate)
    fn = lambda v: ctrl.c * special.erf(ctrl.a * v)
    dfn = lambda v: ctrl.c2 * np.exp(-ctrl.k * v * v)
    phi, dphi = ctrl.kernels(jnp.asarray(COV))
    np.testing.assert_allclose(phi, kernel_matrix(fn, fn, COV), rtol=0, atol=1e-8)
    np.testing.assert_allclose(dphi, kernel_matrix(dfn, dfn, COV), rtol=0, atol=1e-8)
    # The pair is close to (tanh, sech^2) where the fields live (|x| <= 3; measured max misfit 0.028, 0.037).
    x = jnp.linspace(-3.0, 3.0, 61)
    assert jnp.max(jnp.abs(ctrl.fn(x) - jnp.tanh(x))) < 0.03 and jnp.max(jnp.abs(ctrl.dfn(x) - Tanh().dfn(x))) < 0.04
    assert get_activation(lambda h: jnp.sin(h)).control() is None


def test_kernels_batch_over_leading_axes():
    covs = jnp.stack([jnp.asarray(COV), 2 * jnp.asarray(COV)])
    phi, dphi = ReLU().kernels(covs)
    assert phi.shape == dphi.shape == (2, 3, 3)
    # ReLU is positively homogeneous of degree 1: E[phi phi] scales linearly with the covariance.
    np.testing.assert_allclose(phi[1], 2 * phi[0], rtol=1e-12)
    np.testing.assert_allclose(dphi[1], dphi[0], rtol=1e-12)


def test_derivatives():
    x = jnp.linspace(-2.0, 2.0, 8)  # avoids the ReLU kink at 0, where jax.grad returns 1/2
    for act in (Linear(), ReLU(), Erf(), Tanh()):
        grad = jnp.vectorize(jax.grad(act.fn))(x)
        np.testing.assert_allclose(act.dfn(x), grad, atol=1e-12, err_msg=act.name)


def test_custom_callable():
    act = get_activation(lambda h: jnp.tanh(0.8 * h) / 0.8)
    assert isinstance(act, Elementwise)
    x = jnp.linspace(-2, 2, 5)
    np.testing.assert_allclose(act.dfn(x), 1 - jnp.tanh(0.8 * x) ** 2, atol=1e-12)
    fn = lambda v: np.tanh(0.8 * v) / 0.8
    dfn = lambda v: 1 - np.tanh(0.8 * v) ** 2
    phi, dphi = act.kernels(jnp.asarray(COV))
    np.testing.assert_allclose(phi, kernel_matrix(fn, fn, COV), atol=1e-8)
    np.testing.assert_allclose(dphi, kernel_matrix(dfn, dfn, COV), atol=1e-8)


def test_bad_activation():
    with pytest.raises(ValueError, match="unknown activation 'sigmoid'"):
        get_activation("sigmoid")
    with pytest.raises(ValueError, match="activation must be"):
        dmft.MLP(2, activation=3)
