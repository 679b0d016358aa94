"""Response functions of the Monte Carlo DMFT from single-site samples (THEORY section 5).

`Abar^l = gamma0^{-1} <d phi(h^l) / d r^l>` (strictly causal) and `Bbar^{l-1} = gamma0^{-1} <d g^l / d u^l>`
(causal, with the equal-time block Bbar(t, t)), over (time, point) pairs, `(T Pa, T Pa)`:

* `stein`: Gaussian integration by parts, `<f r^T> = <df/dr> K` for a source r of covariance K,
  solved as a causal regression (`causal_stein`). Cheap: O(S (T Pa)^2) moments, O((T Pa)^3) solves.
* `jacobian`: forward-mode derivative of the sample mean of the fields with respect to a common shift
  of the source (`jacobian`), exact per sample; ~T Pa forward passes, for validation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..single_site import segments
from ._sampling import tdot

__all__ = ["RESPONSES", "time_mask", "lower_products", "causal_stein", "jacobian", "jacobian_moments"]

RESPONSES = ("stein", "jacobian", "none")


def time_mask(T, shape, lag, dtype):
    """`shape = (T a, T b)` (time-major rows and columns): 1 where the column time s <= row time t - lag."""
    a, b = shape[0] // T, shape[1] // T
    return jnp.kron(jnp.tril(jnp.ones((T, T), dtype), -lag), jnp.ones((a, b), dtype))


def lower_products(X, Y, T):
    """`X^T Y (T a, T b)` for time-major samples `X (S, T a)`, `Y (S, T b)` on the time-block lower
    staircase of `segments` only (rows of the segment ending at t1 against columns of times < t1),
    zero above: all the causal Stein moments need (their mask keeps s <= t), at about 5/8 of the full
    product's cost."""
    a, b = X.shape[1] // T, Y.shape[1] // T
    rows = [jnp.pad(tdot(X[:, t0 * a : t1 * a], Y[:, : t1 * b]), ((0, 0), (0, (T - t1) * b))) for t0, t1 in segments(T)]
    return jnp.concatenate(rows)


def causal_stein(b, K, rcond, T, lag):
    """The causal response R from the Stein moments `b = <f r^T> (T a, T b)` of a field f and a source
    r of covariance `K (T b, T b)`: `R[t, P] = b[t, P] K[P, P]^{-1}` with P = {s <= t - lag}, the regression of f(t)
    on the sources it depends on (Stein: `<f(t) r(s)> = sum_{s' in P} R(t, s') K(s', s)`). lag = 1 for
    Abar (phi(h(t)) depends on r(s < t)); lag = 0 for Bbar (g(t) also depends on u(t)).

    With the time-ordered Cholesky factor `K + eps I = C C^T` (eps = rcond * mean eigenvalue), the
    leading block of C factors every past block, so all rows take two masked triangular solves:
    `R = mask(mask(b) C^{-T}) C^{-1}`. (A ridge inverse of the whole K instead would spread part of the
    response onto s >= t, which the causal mask then deletes.)
    """
    n = K.shape[0]
    mask = time_mask(T, b.shape, lag, b.dtype)
    C = jnp.linalg.cholesky(K + rcond * jnp.trace(K) / n * jnp.eye(n, dtype=b.dtype))
    Y = jax.scipy.linalg.solve_triangular(C, (b * mask).T, lower=True).T
    return jax.scipy.linalg.solve_triangular(C.T, (Y * mask).T, lower=False).T


def jacobian(mean_field, V, k):
    """`(R V_k) V_k^T (m, n)`: the Jacobian R at 0 of `mean_field: (n,) -> (m,)` (the sample mean of a
    field as a function of a common shift of its source) along the last k columns of V (all for None; the
    eigenvectors of the source covariance with the largest eigenvalues). A response acts only on
    fields in the range of that covariance, so the dropped directions carry at most their
    eigenvalues' share of the field's variance."""
    V = V if k is None else V[:, -k:]
    return jax.jacfwd(lambda a: mean_field(V @ a))(jnp.zeros(V.shape[1], V.dtype)) @ V.T


def jacobian_moments(mean_over_samples, field_fn, eigvecs, k, first, last):
    """`{"A_jac": <d phi(h) / d r>, "B_jac": <d g / d u>}` (A not for the last layer, B not for the first)
    by `jacobian` along the top k eigenvectors `eigvecs = (V_u, V_r)` of the sources.

    `field_fn(u, r) -> (phi, g)` maps a chunk of sources `u (S, T, Pa)`, `r (S, T, Pa C)` to its fields
    `(S, T Pa)`, `(S, T Pa C)`; `mean_over_samples(fn)` averages `fn(u, r)`, the chunk sum, over all sources."""
    out = {}
    if not last:
        shift_r = lambda d: mean_over_samples(lambda u, r: field_fn(u, r + d.reshape(r.shape[1:]))[0].sum(0))
        out["A_jac"] = jacobian(shift_r, eigvecs[1], k)
    if not first:
        shift_u = lambda d: mean_over_samples(lambda u, r: field_fn(u + d.reshape(u.shape[1:]), r)[1].sum(0))
        out["B_jac"] = jacobian(shift_u, eigvecs[0], k)
    return out
