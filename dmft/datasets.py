"""Small data sets for experiments: synthetic inputs on the sphere and scikit-learn's digits."""

from __future__ import annotations

import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._keys import as_key
from .problem import Dataset

__all__ = ["sphere", "digits"]


def _key(key):
    return as_key(key)


def _on_sphere(X):
    """Rescale each row to norm sqrt(D), so that the input kernel has unit diagonal."""
    return X * jnp.sqrt(X.shape[1]) / jnp.linalg.norm(X, axis=1, keepdims=True)


def _split(X, y, P, P_test):
    if P_test:
        return Dataset(X[:P], y[:P], X[P:], y[P:])
    return Dataset(X, y)


def sphere(P: int, D: int, key, *, P_test: int = 0, target: str = "teacher") -> Dataset:
    """`P` (+ `P_test`) inputs uniform on the sphere of radius sqrt(D) with scalar targets.

    `target="teacher"`: `y = beta . x / sqrt(D)` for a random teacher `beta ~ N(0, I_D)`;
    `target="noise"`: i.i.d. normal targets. Either way targets are standardised with the training
    mean and standard deviation. `target="sign"`: labels `y = sign(beta . x)` = +-1 of the same
    teacher, for `Problem(loss="logistic")`.
    """
    if target not in ("teacher", "noise", "sign"):
        raise ValueError(f"target must be 'teacher', 'noise' or 'sign', got {target!r}")
    if P < 1 or D < 1 or P_test < 0:
        raise ValueError(f"need P >= 1, D >= 1, P_test >= 0; got P={P}, D={D}, P_test={P_test}")
    kx, ky = jr.split(_key(key))
    X = _on_sphere(jr.normal(kx, (P + P_test, D)))
    if target == "sign":
        return _split(X, jnp.where(X @ jr.normal(ky, (D,)) >= 0, 1.0, -1.0), P, P_test)
    if target == "teacher":
        y = X @ jr.normal(ky, (D,)) / jnp.sqrt(D)
    else:
        y = jr.normal(ky, (P + P_test,))
    scale = jnp.std(y[:P]) if P > 1 else 1.0
    y = (y - jnp.mean(y[:P])) / scale
    return _split(X, y, P, P_test)


def digits(P: int, key, *, P_test: int = 0, classes=(0, 1)) -> Dataset:
    """Two classes of scikit-learn's 8x8 handwritten digits, targets +1 / -1.

    Pixels are centred with the mean image of the chosen classes and each image is rescaled to
    norm sqrt(64). Needs scikit-learn (`pip install dmft[digits]`).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("dmft.datasets.digits needs scikit-learn: pip install 'dmft[digits]'") from err
    if len(classes) != 2 or classes[0] == classes[1]:
        raise ValueError(f"classes must be two different digits, got {classes!r}")
    X, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, classes)
    X, labels = X[keep], labels[keep]
    if P < 1 or P_test < 0 or P + P_test > len(X):
        raise ValueError(f"need 1 <= P and P + P_test <= {len(X)} for digits {classes}; got P={P}, P_test={P_test}")
    order = np.asarray(jr.permutation(_key(key), len(X)))[: P + P_test]
    X = X[order] - X.mean(axis=0)
    y = np.where(labels[order] == classes[0], 1.0, -1.0)
    return _split(_on_sphere(jnp.asarray(X, dtype=float)), jnp.asarray(y), P, P_test)
