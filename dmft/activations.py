"""Activation functions and their Gaussian kernels.

Every activation is an `equinox.Module` with

* `fn(x)` and `dfn(x)` (elementwise phi and phi'), and
* `kernels(cov) -> (E[phi(u) phi(u)^T], E[phi'(u) phi'(u)^T])` for `u ~ N(0, cov)`, where `cov` is
  any `(..., M, M)` covariance: entry `(mu, nu)` only needs the 2x2 block of `(mu, nu)`.

`Linear`, `ReLU` and `Erf` have closed forms (arc-cosine kernels: Cho & Saul, "Kernel methods for
deep learning", NeurIPS 2009; erf kernel: Williams, "Computing with infinite networks", NeurIPS
1997). `Tanh` and any user callable (`Elementwise`) use two-dimensional Gauss-Hermite quadrature,
which converges spectrally for smooth phi; for a non-smooth callable prefer a closed form or Monte
Carlo.

`control()` gives the Monte Carlo solver a surrogate pair close to (phi, phi') whose kernels have a
closed form, for control variates: the activation itself where it has closed-form kernels, a fitted
erf / Gaussian pair for tanh, None for a user callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AbstractActivation",
    "Linear",
    "ReLU",
    "Tanh",
    "Erf",
    "Elementwise",
    "ErfSurrogate",
    "get_activation",
    "gauss_hermite_kernels",
    "gauss_hermite_pairs",
]


def _pair_covariances(cov):
    """Split `(..., M, M)` into the broadcastable entries (c11, c12, c22) of each 2x2 block."""
    var = jnp.diagonal(cov, axis1=-2, axis2=-1)
    return var[..., :, None], cov, var[..., None, :]


def gauss_hermite_pairs(pairs, cov, degree: int = 128):
    """`E[f(u) g(v)]` for every pair of a `(..., M, M)` covariance and every `(f, g)` in `pairs`, by
    quadrature: a tuple of `(..., M, M)` arrays, entry `(mu, nu)` with `u = u_mu`, `v = u_nu`.

    Uses `u = sqrt(c11) z1`, `v = (c12 / sqrt(c11)) z1 + sqrt(c22 - c12^2 / c11) z2` with z1, z2
    independent standard normals and a tensor Gauss-Hermite rule of `degree` nodes per axis. The sum
    over z1 is a `lax.scan`, so memory is O(M^2 * degree). Convergence is geometric for entire
    functions and slower when phi has complex poles near the real axis: for tanh (poles at +-i pi/2)
    128 nodes reach ~1e-10 at unit variance, 48 nodes only ~1e-6.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    weights = weights / math.sqrt(2.0 * math.pi)
    c11, c12, c22 = _pair_covariances(cov)
    s11 = jnp.sqrt(jnp.maximum(c11, 0.0))
    safe = jnp.where(s11 > 0, s11, 1.0)
    a = jnp.where(s11 > 0, c12 / safe, 0.0)
    b = jnp.sqrt(jnp.maximum(c22 - a**2, 0.0))
    z = jnp.asarray(nodes, dtype=cov.dtype)
    w = jnp.asarray(weights, dtype=cov.dtype)

    def one_node(acc, zw):
        z1, w1 = zw
        u = s11 * z1
        v = a[..., None] * z1 + b[..., None] * z
        return tuple(s + w1 * f(u) * jnp.sum(w * g(v), axis=-1) for s, (f, g) in zip(acc, pairs)), None

    shape = jnp.broadcast_shapes(c11.shape, c12.shape, c22.shape)
    zeros = tuple(jnp.zeros(shape, cov.dtype) for _ in pairs)
    return jax.lax.scan(one_node, zeros, (z, w))[0]


def gauss_hermite_kernels(fn, dfn, cov, degree: int = 128):
    """`E[fn(u) fn(v)]` and `E[dfn(u) dfn(v)]` for every pair of a `(..., M, M)` covariance, by
    quadrature (`gauss_hermite_pairs`)."""
    return gauss_hermite_pairs(((fn, fn), (dfn, dfn)), cov, degree)


class AbstractActivation(eqx.Module):
    """An elementwise nonlinearity phi with its derivative and Gaussian kernels.

    `smooth`: whether JAX derivatives of `dfn` are the true higher derivatives of phi (perturbation
    theory needs the second and third); False for piecewise-linear functions such as ReLU.
    """

    smooth = True

    def fn(self, x):
        raise NotImplementedError

    def dfn(self, x):
        """phi'(x); by default from JAX autodiff of `fn`."""
        return jnp.vectorize(jax.grad(self.fn))(x)

    def kernels(self, cov):
        """`(E[phi(u)phi(u)^T], E[phi'(u)phi'(u)^T])` for `u ~ N(0, cov)`, shapes `(..., M, M)`."""
        return gauss_hermite_kernels(self.fn, self.dfn, cov)

    def control(self) -> AbstractActivation | None:
        """A pair `(fn, dfn)` close to `(phi, phi')` with closed-form `kernels`, for Monte Carlo
        control variates (`dmft.MonteCarlo(control_variates=True)`); None when there is none."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__.lower()


class _ClosedForm:
    """Mixin: the activation's own kernels are closed forms, so it is its own control pair."""

    def control(self):
        return self


class Linear(_ClosedForm, AbstractActivation):
    """phi(h) = h: deep linear networks (the exact closure of THEORY section 6 applies)."""

    def fn(self, x):
        return x

    def dfn(self, x):
        return jnp.ones_like(x)

    def kernels(self, cov):
        return cov, jnp.ones_like(cov)


class ReLU(_ClosedForm, AbstractActivation):
    """phi(h) = max(h, 0), phi'(h) = 1[h > 0]; arc-cosine kernels of degree 1 and 0."""

    smooth = False  # the second derivative is a delta function, which autodiff of dfn reports as 0

    def fn(self, x):
        return jnp.maximum(x, 0.0)

    def dfn(self, x):
        return jnp.where(x > 0, 1.0, 0.0).astype(jnp.result_type(x, float))

    def kernels(self, cov):
        c11, c12, c22 = _pair_covariances(cov)
        norm = jnp.sqrt(jnp.maximum(c11 * c22, 0.0))
        positive = norm > 0
        cos = jnp.clip(c12 / jnp.where(positive, norm, 1.0), -1.0, 1.0)
        theta = jnp.arccos(cos)
        phi = norm / (2 * jnp.pi) * (jnp.sin(theta) + (jnp.pi - theta) * cos)
        dphi = jnp.where(positive, (jnp.pi - theta) / (2 * jnp.pi), 0.0)
        return phi, dphi


class Erf(_ClosedForm, AbstractActivation):
    """phi(h) = erf(h); Williams (1997) closed forms."""

    def fn(self, x):
        return jax.scipy.special.erf(x)

    def dfn(self, x):
        return 2.0 / math.sqrt(math.pi) * jnp.exp(-(x**2))

    def kernels(self, cov):
        c11, c12, c22 = _pair_covariances(cov)
        norm = (1 + 2 * c11) * (1 + 2 * c22)
        phi = 2 / jnp.pi * jnp.arcsin(jnp.clip(2 * c12 / jnp.sqrt(norm), -1.0, 1.0))
        # E[exp(-u^2 - v^2)] = det(I + 2 Sigma)^(-1/2).
        dphi = 4 / jnp.pi / jnp.sqrt(norm - 4 * c12**2)
        return phi, dphi


class ErfSurrogate(_ClosedForm, AbstractActivation):
    """The control pair `fn(x) = c erf(a x)`, `dfn(x) = c2 exp(-k x^2)` with closed-form kernels
    (Erf's at the rescaled covariances `a^2 cov` and `k cov`). `dfn` is deliberately not the
    derivative of `fn`: each is fitted to its own target (phi, phi'), because the two control
    variates (for Phi and for G) are independent."""

    c: float
    a: float
    c2: float
    k: float

    def fn(self, x):
        return self.c * jax.scipy.special.erf(self.a * x)

    def dfn(self, x):
        return self.c2 * jnp.exp(-self.k * x**2)

    def kernels(self, cov):
        # E[exp(-k u^2 - k v^2)] = (pi / 4) x Erf's derivative kernel at k cov.
        return self.c**2 * Erf().kernels(self.a**2 * cov)[0], self.c2**2 * jnp.pi / 4 * Erf().kernels(self.k * cov)[1]


class Tanh(AbstractActivation):
    """phi(h) = tanh(h); kernels by Gauss-Hermite quadrature."""

    def fn(self, x):
        return jnp.tanh(x)

    def dfn(self, x):
        return 1.0 - jnp.tanh(x) ** 2

    def control(self):
        # Weighted least squares under N(0, 1): rms misfit 0.006 (tanh) and 0.018 (sech^2).
        return ErfSurrogate(c=0.96744, a=0.89265, c2=0.98267, k=0.83233)


class Elementwise(AbstractActivation):
    """Any JAX-differentiable scalar function, e.g. `Elementwise(lambda h: jnp.tanh(0.8 * h) / 0.8)`.

    `derivative` defaults to `jax.grad(fn)`; kernels come from Gauss-Hermite quadrature with
    `degree` nodes per axis (spectrally accurate for smooth functions only).
    """

    function: Callable = eqx.field(static=True)
    derivative: Callable | None = eqx.field(static=True, default=None)
    degree: int = eqx.field(static=True, default=128)
    label: str = eqx.field(static=True, default="custom")

    def fn(self, x):
        return self.function(x)

    def dfn(self, x):
        if self.derivative is not None:
            return self.derivative(x)
        return jnp.vectorize(jax.grad(self.function))(x)

    def kernels(self, cov):
        return gauss_hermite_kernels(self.fn, self.dfn, cov, self.degree)

    @property
    def name(self) -> str:
        return self.label


_BY_NAME = {"linear": Linear, "relu": ReLU, "tanh": Tanh, "erf": Erf}


def get_activation(spec) -> AbstractActivation:
    """An activation from a name (`"linear"`, `"relu"`, `"tanh"`, `"erf"`), an object, or a callable."""
    if isinstance(spec, AbstractActivation):
        return spec
    if isinstance(spec, str):
        try:
            return _BY_NAME[spec.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown activation {spec!r}; use one of {sorted(_BY_NAME)}, an "
                "AbstractActivation, or a JAX-differentiable callable"
            ) from None
    if callable(spec):
        return Elementwise(spec, label=getattr(spec, "__name__", "custom"))
    raise ValueError(
        f"activation must be a name {sorted(_BY_NAME)}, an AbstractActivation or a callable, got {type(spec).__name__}"
    )
