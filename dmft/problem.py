"""What to solve: data, architecture, feature-learning strength and time grid (THEORY section 1).

Shapes: P training points, P_test test points, Pa = P + P_test, D input dimension, L = depth hidden
layers, n = n_steps time steps on the grid t_k = k dt, k = 0..n, dt = t_max / n_steps.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .activations import AbstractActivation, get_activation
from .losses import AbstractLoss, get_loss

__all__ = ["Dataset", "MLP", "Problem"]


def _concrete(x):
    """`x` as a NumPy array, or None when it is traced (validation then happens elsewhere)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_scalar(name, value, lower, strict):
    """Raise unless a concrete `value` is a finite scalar above `lower` (or equal, unless `strict`)."""
    v = _concrete(value)
    if v is None:
        return
    if v.shape != () or not np.isfinite(v) or v < lower or (strict and v == lower):
        bound = f"> {lower:g}" if strict else f">= {lower:g}"
        raise ValueError(f"{name} must be a finite scalar {bound}; got {value!r}")


def _as_inputs(X, name):
    arr = np.asarray(X) if not isinstance(X, jax.core.Tracer) else None
    if arr is not None:
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{name} must have shape (P, D) with P, D >= 1; got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf; clean the data before building a Dataset")
    return jnp.asarray(X, dtype=float)


def _as_targets(y, n, name, C=None):
    """Targets `(n,)` or `(n, C)` (`(n, 1)` becomes `(n,)`); `C` given: the shape train targets fixed."""
    arr = np.asarray(y) if not isinstance(y, jax.core.Tracer) else None
    if arr is not None:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
            y = jnp.asarray(y)[:, 0]
        ok = arr.shape[:1] == (n,) and arr.ndim in (1, 2) and (C is None or arr.shape[1:] == C)
        if not ok:
            want = f"({n},) or ({n}, C)" if C is None else str((n, *C))
            raise ValueError(
                f"{name} must have shape {want} (a scalar target or C outputs per input); got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf")
    return jnp.asarray(y, dtype=float)


class Dataset(eqx.Module):
    """Training inputs `X (P, D)` and targets `y`, optionally test inputs `X_test (P_test, D)`.

    Targets are scalar, `y (P,)`, or have C outputs, `y (P, C)` (`dmft.datasets.one_hot` makes them
    from labels); a Solution's predictions then have shape `(n+1, P)` or `(n+1, P, C)`. `y_test`
    (same trailing shape) is optional even when `X_test` is given (then only test predictions are made).
    The input kernel of THEORY section 1 is `Kx = X_all X_all^T / D` over train then test points.
    """

    X: jax.Array
    y: jax.Array
    X_test: jax.Array | None = None
    y_test: jax.Array | None = None

    def __init__(self, X, y, X_test=None, y_test=None):
        self.X = _as_inputs(X, "X")
        self.y = _as_targets(y, self.X.shape[0], "y")
        if X_test is None:
            if y_test is not None:
                raise ValueError("y_test was given without X_test; pass both or neither")
            self.X_test = self.y_test = None
            return
        self.X_test = _as_inputs(X_test, "X_test")
        if self.X_test.shape[1] != self.X.shape[1]:
            raise ValueError(
                f"X_test has {self.X_test.shape[1]} features but X has {self.X.shape[1]}; "
                "train and test inputs must have the same dimension D"
            )
        self.y_test = None if y_test is None else _as_targets(y_test, self.X_test.shape[0], "y_test", self.y.shape[1:])

    @property
    def P(self) -> int:
        return self.X.shape[0]

    @property
    def P_test(self) -> int:
        return 0 if self.X_test is None else self.X_test.shape[0]

    @property
    def D(self) -> int:
        return self.X.shape[1]

    @property
    def C(self) -> int:
        """Outputs per input: 1 for scalar targets `y (P,)`."""
        return 1 if self.y.ndim == 1 else self.y.shape[1]

    @property
    def Y(self) -> jax.Array:
        """The targets with their class axis, `(P, C)`."""
        return self.y.reshape(self.P, self.C)

    @property
    def Y_test(self) -> jax.Array | None:
        """The test targets with their class axis, `(P_test, C)`, or None."""
        return None if self.y_test is None else self.y_test.reshape(self.P_test, self.C)

    @property
    def X_all(self) -> jax.Array:
        """Train then test inputs, `(Pa, D)`."""
        return self.X if self.X_test is None else jnp.concatenate([self.X, self.X_test])

    @property
    def Kx(self) -> jax.Array:
        """Input kernel `Phi^0 = x . x' / D` over train then test points, `(Pa, Pa)`."""
        X = self.X_all
        return X @ X.T / self.D


class MLP(eqx.Module):
    """A fully connected network with `depth = L` hidden layers of equal width (THEORY 1, 11).

    Every layer, the read-out included, multiplies its N(0, 1) weights by `sigma_w` and adds N(0, 1)
    biases times `sigma_b` (the convention of neural-tangents' `stax.Dense(W_std, b_std)`):
    `h^1 = sigma_w W^0 x / sqrt(D) + sigma_b b^0`, `h^{l+1} = sigma_w W^l phi(h^l) / sqrt(N) + sigma_b b^l`,
    `f = (sigma_w w . phi(h^L) / N + sigma_b b^L / sqrt(N)) / gamma0`; every tensor, biases included,
    trains with the rate `eta0 gamma0^2 N`. The defaults (1, 0) are the bias-free network of the paper.
    `sigma_w`, `sigma_b` are traced (vmappable) scalars.
    """

    depth: int = eqx.field(static=True)
    activation: AbstractActivation
    sigma_w: jax.Array = eqx.field(converter=jnp.asarray)
    sigma_b: jax.Array = eqx.field(converter=jnp.asarray)

    def __init__(self, depth: int = 1, activation="relu", sigma_w=1.0, sigma_b=0.0):
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (hidden layers); got {depth!r}")
        _check_scalar("sigma_w", sigma_w, 0.0, strict=True)
        _check_scalar("sigma_b", sigma_b, 0.0, strict=False)
        self.depth = int(depth)
        self.activation = get_activation(activation)
        self.sigma_w = jnp.asarray(sigma_w, dtype=float)
        self.sigma_b = jnp.asarray(sigma_b, dtype=float)

    @property
    def sw2(self) -> jax.Array:
        """`sigma_w^2`: the variance of the backward sources `r^l` per unit of `G^{l+1}`, and the factor
        of the responses and of the backward memory (THEORY 11)."""
        return self.sigma_w**2

    def preactivation_kernel(self, Phi):
        """`Phi~ = sigma_w^2 Phi + sigma_b^2`: the covariance of the next layer's preactivation source
        given the kernel `Phi` of this layer's activations (or the input kernel), any shape (THEORY 11)."""
        return self.sigma_w**2 * Phi + self.sigma_b**2


class Problem(eqx.Module):
    """A DMFT problem: gradient flow on a loss (default the MSE `0.5 mean (f - y)^2`) from `f(0) = 0`.

    **Arguments:**

    - `data`: a `Dataset`.
    - `net`: an `MLP`.
    - `gamma0`: feature-learning strength (>= 0; 0 is the lazy limit). Traced, so it can be vmapped.
    - `t_max`, `n_steps`: the time grid `ts = linspace(0, t_max, n_steps + 1)`, `dt = t_max / n_steps`.
    - `eta0`: learning-rate prefactor (the rate is `eta0 * gamma0^2 * N`); traced.
    - `loss`: `"mse"` (default), `"logistic"` (one output, labels +-1, `log(1 + exp(-y f))`),
      `"cross_entropy"` (C >= 2 outputs, one-hot targets, softmax), or a `dmft.losses.AbstractLoss`;
      the solvers see it only through the error signal `Delta = -dl/df`.
    """

    data: Dataset
    net: MLP
    gamma0: jax.Array = eqx.field(converter=jnp.asarray)
    t_max: jax.Array = eqx.field(converter=jnp.asarray)
    n_steps: int = eqx.field(static=True)
    eta0: jax.Array = eqx.field(converter=jnp.asarray)
    loss: AbstractLoss

    def __init__(self, data, net, gamma0=1.0, t_max=10.0, n_steps=200, eta0=1.0, loss="mse"):
        if not isinstance(data, Dataset):
            raise ValueError(f"data must be a dmft.Dataset, got {type(data).__name__}")
        if not isinstance(net, MLP):
            raise ValueError(f"net must be a dmft.MLP, got {type(net).__name__}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1; got {n_steps!r}")
        _check_scalar("gamma0", gamma0, 0.0, strict=False)
        _check_scalar("t_max", t_max, 0.0, strict=True)
        _check_scalar("eta0", eta0, 0.0, strict=True)
        # One precision, JAX's current default: a Dataset or MLP built under the other x64 setting is cast.
        as_default = lambda x: jnp.asarray(x, dtype=float) if eqx.is_inexact_array(x) else x
        self.data, self.net = jax.tree.map(as_default, (data, net))
        self.n_steps = int(n_steps)
        self.gamma0 = jnp.asarray(gamma0, dtype=float)
        self.t_max = jnp.asarray(t_max, dtype=float)
        self.eta0 = jnp.asarray(eta0, dtype=float)
        self.loss = get_loss(loss)
        for name, y in (("y", data.y), ("y_test", data.y_test)):
            targets = None if y is None else _concrete(y)
            if targets is not None:
                self.loss.check_targets(targets, name)

    @property
    def depth(self) -> int:
        return self.net.depth

    @property
    def activation(self) -> AbstractActivation:
        return self.net.activation

    @property
    def P(self) -> int:
        return self.data.P

    @property
    def C(self) -> int:
        return self.data.C

    @property
    def dt(self) -> jax.Array:
        return self.t_max / self.n_steps

    @property
    def ts(self) -> jax.Array:
        """The time grid, `(n + 1,)`."""
        return jnp.linspace(0.0, self.t_max, self.n_steps + 1)
