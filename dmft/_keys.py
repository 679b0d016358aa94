"""One conversion of user seeds into JAX PRNG keys, shared by every entry point that takes `key=`."""

from __future__ import annotations

import jax
import jax.random as jr
import numpy as np

__all__ = ["as_key"]


def as_key(key, name: str = "key") -> jax.Array:
    """A typed JAX PRNG key from a Python or NumPy integer, a typed key (`jax.random.key`) or a raw
    `uint32[2]` key (`jax.random.PRNGKey`). Anything else raises a `ValueError` naming `name`."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return jr.key(int(key))
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if dtype == np.uint32 and np.shape(key)[-1:] == (2,):
        return jr.wrap_key_data(key)
    raise ValueError(
        f"{name} must be an integer seed or a JAX PRNG key (jax.random.key(...)), got {type(key).__name__}"
    )
