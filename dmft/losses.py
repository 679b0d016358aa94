"""Training losses: the value `l(f, y)` averaged over points and the error signal `Delta = -dl/df`.

THEORY 1 leaves the loss open: every solver and the networks use only `Delta` (in the prediction
dynamics `df/dt = (eta0 / P) K Delta` and in the memory kernels of the single site) and the value.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AbstractLoss", "MSE", "Logistic", "get_loss"]


class AbstractLoss(eqx.Module):
    """A loss per point `l(f, y)`; `value` and `accuracy` average over the last axis."""

    def value(self, f, y):
        raise NotImplementedError

    def delta(self, f, y):
        """The error signal `-dl/df`, elementwise."""
        raise NotImplementedError

    def accuracy(self, f, y):
        """The fraction of correctly classified points, or None for a regression loss."""
        return None

    def check_targets(self, y, name):
        """Raise a ValueError when concrete targets `y` do not suit the loss."""

    @property
    def name(self) -> str:
        return type(self).__name__.lower()


class MSE(AbstractLoss):
    """`l = (f - y)^2 / 2`, `Delta = y - f`: the paper's square loss."""

    def value(self, f, y):
        return 0.5 * jnp.mean((f - y) ** 2, axis=-1)

    def delta(self, f, y):
        return y - f


class Logistic(AbstractLoss):
    """Binary classification with labels `y = +-1`: `l = log(1 + exp(-y f))`, `Delta = y sigmoid(-y f)`.

    A point counts as correctly classified when `y f > 0` (so none is at `f = 0`, the start)."""

    def value(self, f, y):
        return jnp.mean(jax.nn.softplus(-y * f), axis=-1)

    def delta(self, f, y):
        return y * jax.nn.sigmoid(-y * f)

    def accuracy(self, f, y):
        return jnp.mean(y * f > 0, axis=-1)

    def check_targets(self, y, name):
        if not np.all(np.abs(y) == 1):
            raise ValueError(
                f'loss="logistic" needs labels y = +1 or -1, but {name} has other values; map 0/1 labels '
                "with y = 2 * label - 1"
            )


_BY_NAME = {"mse": MSE, "logistic": Logistic}


def get_loss(spec) -> AbstractLoss:
    """A loss from a name (`"mse"`, `"logistic"`) or an `AbstractLoss`."""
    if isinstance(spec, AbstractLoss):
        return spec
    if isinstance(spec, str) and spec.lower() in _BY_NAME:
        return _BY_NAME[spec.lower()]()
    raise ValueError(f"unknown loss {spec!r}; use one of {sorted(_BY_NAME)} or an AbstractLoss")
