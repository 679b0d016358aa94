"""Small data sets for experiments: synthetic inputs on the sphere and scikit-learn's digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._keys import as_key
from .problem import Dataset

__all__ = ["sphere", "digits", "one_hot"]


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


def one_hot(labels, n_classes: int) -> jax.Array:
    """Targets `(P, n_classes)` with a 1 in the column of each integer label in `[0, n_classes)`, for
    `Problem(loss="cross_entropy")` (for the MSE subtract `1 / n_classes` to centre them)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d array of integers; got dtype {labels.dtype}, shape {labels.shape}")
    if n_classes < 2 or labels.min(initial=0) < 0 or labels.max(initial=0) >= n_classes:
        raise ValueError(
            f"labels must lie in [0, n_classes) with n_classes >= 2; got n_classes={n_classes}, "
            f"labels in [{labels.min()}, {labels.max()}]"
        )
    return jnp.asarray(np.eye(n_classes)[labels], dtype=float)


def digits(P: int, key, *, P_test: int = 0, classes=(0, 1)) -> Dataset:
    """scikit-learn's 8x8 handwritten digits of the given `classes`.

    Two classes: targets +1 (the first) / -1 (for `loss="logistic"` or the MSE); more: one-hot
    targets `(P, C)` in the order of `classes` (for `loss="cross_entropy"`). Pixels are centred with
    the mean image of the chosen classes and each image is rescaled to norm sqrt(64). Needs
    scikit-learn (`pip install dmft[digits]`).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("dmft.datasets.digits needs scikit-learn: pip install 'dmft[digits]'") from err
    classes = tuple(int(c) for c in classes)
    if len(classes) < 2 or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
        raise ValueError(f"classes must be two or more different digits 0-9, got {classes!r}")
    X, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, classes)
    X, labels = X[keep], labels[keep]
    if P < 1 or P_test < 0 or P + P_test > len(X):
        raise ValueError(f"need 1 <= P and P + P_test <= {len(X)} for digits {classes}; got P={P}, P_test={P_test}")
    order = np.asarray(jr.permutation(_key(key), len(X)))[: P + P_test]
    X = X[order] - X.mean(axis=0)
    if len(classes) == 2:
        y = jnp.asarray(np.where(labels[order] == classes[0], 1.0, -1.0))
    else:
        y = one_hot(np.array([classes.index(c) for c in labels[order]]), len(classes))
    return _split(_on_sphere(jnp.asarray(X, dtype=float)), y, P, P_test)
