"""Training losses: the value `l(f, y)` averaged over points and the error signal `Delta = -dl/df`.

THEORY 1 leaves the loss open: every solver and the networks use only `Delta` (in the prediction
dynamics `df/dt = (eta0 / P) K Delta` and in the memory kernels of the single site) and the value.
Predictions and targets carry a trailing class axis: `f (..., P, C)`, `y (P, C)` (C = 1 for a scalar
output); the loss of a point is summed over its outputs.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AbstractLoss", "MSE", "Logistic", "CrossEntropy", "get_loss"]


class AbstractLoss(eqx.Module):
    """A loss per point `l(f_mu, y_mu)` of its C outputs; `value` and `accuracy` take `f (..., P, C)`,
    `y (P, C)` and average over the points."""

    def value(self, f, y):
        raise NotImplementedError

    def delta(self, f, y):
        """The error signal `-dl/df`, elementwise."""
        raise NotImplementedError

    def accuracy(self, f, y):
        """The fraction of correctly classified points, or None for a regression loss."""
        return None

    def check_targets(self, y, name):
        """Raise a ValueError when concrete targets `y` (as given: `(P,)` or `(P, C)`) do not suit the loss."""

    @property
    def name(self) -> str:
        return type(self).__name__.lower()


class MSE(AbstractLoss):
    """`l = |f - y|^2 / 2` (summed over outputs), `Delta = y - f`: the paper's square loss."""

    def value(self, f, y):
        return 0.5 * jnp.mean(jnp.sum((f - y) ** 2, axis=-1), axis=-1)

    def delta(self, f, y):
        return y - f


class Logistic(AbstractLoss):
    """Binary classification with labels `y = +-1`: `l = log(1 + exp(-y f))`, `Delta = y sigmoid(-y f)`.

    A point counts as correctly classified when `y f > 0` (so none is at `f = 0`, the start). One
    output only (use `"cross_entropy"` for several classes)."""

    def value(self, f, y):
        return jnp.mean(jnp.sum(jax.nn.softplus(-y * f), axis=-1), axis=-1)

    def delta(self, f, y):
        return y * jax.nn.sigmoid(-y * f)

    def accuracy(self, f, y):
        return jnp.mean(y[..., 0] * f[..., 0] > 0, axis=-1)

    def check_targets(self, y, name):
        if y.ndim == 2 and y.shape[1] > 1:
            raise ValueError(
                f'loss="logistic" is binary (one output), but {name} has {y.shape[1]} columns; use '
                'loss="cross_entropy" with one-hot targets (dmft.datasets.one_hot) for several classes'
            )
        if not np.all(np.abs(y) == 1):
            raise ValueError(
                f'loss="logistic" needs labels y = +1 or -1, but {name} has other values; map 0/1 labels '
                "with y = 2 * label - 1"
            )


class CrossEntropy(AbstractLoss):
    """Softmax cross-entropy over C >= 2 outputs with one-hot (or probability) targets `y (P, C)`:
    `l = logsumexp(f) - y . f`, `Delta = y - softmax(f)`. A point is correctly classified when its
    largest output is its label's (`argmax f = argmax y`; at `f = 0` the tie goes to class 0)."""

    def value(self, f, y):
        return jnp.mean(jax.nn.logsumexp(f, axis=-1) - jnp.sum(y * f, axis=-1), axis=-1)

    def delta(self, f, y):
        return y - jax.nn.softmax(f, axis=-1)

    def accuracy(self, f, y):
        return jnp.mean(jnp.argmax(f, axis=-1) == jnp.argmax(y, axis=-1), axis=-1)

    def check_targets(self, y, name):
        if y.ndim != 2 or y.shape[1] < 2:
            raise ValueError(
                f'loss="cross_entropy" needs targets of shape (P, C) with C >= 2 classes, but {name} has '
                f"shape {y.shape}; turn integer labels into targets with dmft.datasets.one_hot(labels, C)"
            )
        if np.any(y < 0) or not np.allclose(y.sum(1), 1.0):
            raise ValueError(
                f'loss="cross_entropy" needs one-hot (or probability) rows: {name} must be >= 0 with rows '
                "summing to 1 (dmft.datasets.one_hot(labels, C))"
            )

    @property
    def name(self) -> str:
        return "cross_entropy"


_BY_NAME = {"mse": MSE, "logistic": Logistic, "cross_entropy": CrossEntropy}


def get_loss(spec) -> AbstractLoss:
    """A loss from a name (`"mse"`, `"logistic"`, `"cross_entropy"`) or an `AbstractLoss`."""
    if isinstance(spec, AbstractLoss):
        return spec
    if isinstance(spec, str) and spec.lower() in _BY_NAME:
        return _BY_NAME[spec.lower()]()
    raise ValueError(f"unknown loss {spec!r}; use one of {sorted(_BY_NAME)} or an AbstractLoss")
