"""How `MonteCarlo` draws its Gaussian sources and averages over them.

* Standard normals (`normals`): `"sobol"`, a randomised quasi-Monte Carlo net (one random digital
  shift per replica; its leading coordinates along the directions of largest source variance,
  `sobol_axes`); `"plain"`, independent pseudo-random normals; `"antithetic"`, pairs `(e_u, +-e_r)`.
  Every sample is a fixed function of the key and its index, so a result never depends on how the
  samples are cut into chunks.
* Sources from normals (`factor`, `sources`): `u = M_u e_u ~ N(0, Phi^{l-1})`, `r = M_r e_r ~ N(0, G^{l+1})`
  with `M` the symmetric square root of the covariance (round-off eigenvalues zeroed, `_roots`), which
  is continuous in the covariance: the common-random-number map stays continuous. The replicas, near a
  centre whose eigensystem is known, take it to first order (`factor_near`).
* Control variates (`gram`): subtract from a sample moment the same moment of the lazy fields
  `psi(u)`, `chi(u) r` of the same sources; the solver adds back their exact (closed-form) means,
  `E[psi psi^T] = ctrl.kernels(Su)[0]` and `E[chi r (chi r)^T] = ctrl.kernels(Su)[1] * Sr`.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.scipy.special import ndtri

from .. import _mesh

__all__ = [
    "SAMPLINGS",
    "SOBOL_MAX_DIM",
    "Replicated",
    "factor",
    "factor_near",
    "sobol_axes",
    "normals",
    "fold_axes",
    "sources",
    "gram",
    "tdot",
    "replica_mean",
    "replica_std",
    "stderr",
]

SAMPLINGS = ("sobol", "plain", "antithetic")
SOBOL_MAX_DIM = 21201  # scipy.stats.qmc.Sobol's direction numbers (Joe & Kuo)


class Replicated(eqx.Module):
    """How a sampling solver cuts its `n_samples` into `n_replicas` replicas and each replica into
    chunks of at most `chunk_size`; the subclass declares those fields and `sampling`."""

    @property
    def _per_replica(self):
        return self.n_samples // self.n_replicas

    @property
    def _chunk(self):
        """Samples per chunk: `chunk_size`, or 1024 when it is None (`MonteCarlo.sized` may lower it)."""
        return min(1024 if self.chunk_size is None else self.chunk_size, self._per_replica)

    def _normals(self, key, i, du, dr, axes, dtype):
        """Standard normals of chunk i of the replica of `key` (`normals`): the same in every iteration."""
        n = self._chunk
        return normals(self.sampling, key, i * n, n, self._per_replica, du, dr, axes, dtype)


def factor(K):
    """`(M, V)`: the symmetric square root `M = K^{1/2}` of a covariance `(n, n)` (eigenvalues within
    round-off of zero set to zero, `_roots`) and its eigenvectors V in increasing eigenvalue order.

    The symmetric root is unique and continuous in K; a factor `V sqrt(lam)` is not (eigenvectors of
    (near-)degenerate eigenvalues rotate and flip sign between iterations), which would make the
    common-random-number map discontinuous and the iteration cycle.
    """
    lam, V = jnp.linalg.eigh(K)
    return (V * _roots(lam)) @ V.T, V


def _roots(lam):
    """`sqrt(lam)` of eigenvalues `(n,)` of a covariance, zero at or below `tol = sqrt(n) eps max|lam|`.

    A singular covariance (layer 1's `Kx` with more points than input dimensions; a kernel constant in
    time, as the lazy kernels a solve starts from, has rank Pa of T Pa) has eigenvalues eigh returns as
    round-off, a few eps max|lam| growing slowly with n (`benchmarks/RESULTS.md`). Their square roots,
    `~sqrt(eps)` relative, would put that much noise into the samples, and the answer would depend at
    that level on how the compiled program rounds (its chunk size, its devices), a relu solve by more (a
    source moved by ~1e-8 flips `phi'` of the preactivations that near zero). The cut-off is above those
    with a margin that grows with n as eigh's error bound does; the genuine eigenvalues it drops, if any,
    hold at most `n^1.5 eps max|lam|` of the variance, and the root jumps by `sqrt(tol)` where an
    eigenvalue crosses it."""
    tol = math.sqrt(lam.shape[-1]) * jnp.finfo(lam.dtype).eps * jnp.max(jnp.abs(lam))
    return jnp.sqrt(jnp.where(lam > tol, lam, 0.0))


def factor_near(K, ref, rcond, tol):
    """`(M, V)` as `factor`, for a covariance K near a reference `K0 = V diag(lam) V^T` whose eigensystem
    `ref = (V, lam)` is known: the symmetric root to first order in `E = V^T K V - diag(lam)`,
    `M = V (diag(s) + X) V^T`, `X = E / (s_i + s_j)` with `s = _roots(lam)` (the solution of
    `M0 X + X M0 = K - K0`), in four matrix products instead of an eigendecomposition. The root of a
    near-zero eigenvalue is not differentiable: `s_i + s_j` is floored at `2 sqrt(rcond * mean(lam))`,
    the scale below which the Stein regressions' ridge hides a direction anyway.

    The square of M, the covariance the sources really have, is `K + V X^2 V^T`: it overshoots K by a
    positive semidefinite second-order term, which far from the reference grows the sources, hence
    the kernels, hence the overshoot. Where its bound `||X||^2 >= ||X^2||` exceeds `tol ||K||`
    (Frobenius norms) the exact root (`factor`) is taken instead.
    """
    V, lam = ref
    s = _roots(lam)
    floor = jnp.maximum(2 * jnp.sqrt(rcond * jnp.mean(s**2)), jnp.finfo(K.dtype).tiny)
    E = V.T @ K @ V - jnp.diag(lam)
    X = E / jnp.maximum(s[:, None] + s[None, :], floor)
    near = jnp.sum(X * X) <= tol * jnp.linalg.norm(K)
    return jax.lax.cond(near, lambda: (V @ (jnp.diag(s) + X) @ V.T, V), lambda: factor(K))


def sobol_axes(K0, T, C=1):
    """Fixed orthonormal axes `(T M C, T M C)` for the quasi-random coordinates of a source over T
    times, M points and C classes, in decreasing expected variance: time cosine modes (DCT-II) times
    the eigenvectors of the lazy kernel `K0 (M, M)` times the classes (the lazy gradient kernels are
    `K0 (x) I_C`, `dynamics.with_classes`), column `(k, j, c)` weighted `lam_j / (1 + k)^2` (two-time
    kernels are smooth in time, so their variance sits in the slow modes). The axes must not change
    between iterations (the current kernels' eigenvectors rotate and flip), or the map is not
    deterministic.

    The axes are the same on every backend: each eigenvector's largest entry is made positive (eigh
    fixes an eigenvector only up to its sign, and flipping an axis turns the net's digital shift on
    that coordinate into its complement: another sample), and the classes' degenerate eigenspaces
    are spanned by the unit vectors of the classes rather than by whatever basis eigh returns.
    """
    lam, V = jnp.linalg.eigh(K0)
    peak = jnp.take_along_axis(V, jnp.argmax(jnp.abs(V), axis=0)[None], axis=0)
    V = V * jnp.where(peak < 0, -1.0, 1.0).astype(V.dtype)
    k = np.arange(T)
    dct = np.sqrt(2.0 / T) * np.cos(np.pi * (k[:, None] + 0.5) * k[None, :] / T)  # column k: mode k
    dct[:, 0] /= np.sqrt(2.0)
    axes = jnp.kron(jnp.asarray(dct, K0.dtype), jnp.kron(V, jnp.eye(C, dtype=V.dtype)))
    weight = jnp.kron(1.0 / (1.0 + k) ** 2, jnp.repeat(jnp.maximum(lam, 0.0), C))
    return axes[:, jnp.argsort(-weight, stable=True)]


@functools.lru_cache(maxsize=8)
def _sobol_points(n, du, dr):
    """`(n, du + dr)` uint32: the first n (a power of 2) points of the unscrambled Sobol sequence, as
    integers `x * 2^32` (exact: scipy's coordinates are multiples of 2^-30), the columns of u first,
    then those of r (`_u_then_r`): contiguous slices on the device. Host side, cached."""
    from scipy.stats import qmc

    x = qmc.Sobol(du + dr, scramble=False).random_base2(int(n).bit_length() - 1)
    return np.ldexp(x[:, _u_then_r(du, dr)], 32).astype(np.uint32)


def _u_then_r(du, dr):
    """`(du + dr,)` indices of the Sobol coordinates of u's columns, then r's: the coordinates go to
    u and r alternately, u_1, r_1, u_2, r_2, ... (best first)."""
    order = sorted([(k, 0) for k in range(du)] + [(k, 1) for k in range(dr)])
    return np.array([j for side in (0, 1) for j, o in enumerate(order) if o[1] == side], dtype=int)


def _sobol(key, start, n, n_total, du, dr, dtype):
    """Rows `[start, start + n)` of a digitally shifted Sobol net of `n_total` points in `du + dr`
    dimensions, mapped to standard normals `(e_u (n, du), e_r (n, dr))`.

    One random XOR shift per coordinate keeps every point uniform (unbiased) and every aligned
    power-of-2 block a net. The uniforms are the centres of `2^-bits` cells, with `bits` such that
    the largest is below 1 in the dtype (float32 cannot resolve 2^-32: ndtri(1) = inf).
    """
    table = jnp.asarray(_sobol_points(n_total, du, dr))
    shift = jr.bits(key, (du + dr,), jnp.uint32)[_u_then_r(du, dr)]
    x = jax.lax.dynamic_slice_in_dim(table, start, n) ^ shift
    bits = min(32, jnp.finfo(dtype).nmant)
    # u and r mapped apart: XLA fuses the map into every consumer and would otherwise recompute all
    # du + dr coordinates wherever a few are used (the last layer's one read-out weight per sample).
    normal = lambda x: ndtri(((x >> (32 - bits)).astype(dtype) + 0.5) * 2.0**-bits)
    return normal(x[:, :du]), normal(x[:, du:])


def normals(sampling, key, start, n, n_total, du, dr, axes, dtype):
    """Standard normals `(e_u (n, du), e_r (n, dr))` of samples `[start, start + n)` out of `n_total`.

    `axes = (V_u, V_r)`: the Sobol axes (`sobol_axes`, or None for a coordinate that has none); the
    quasi-random coordinates are rotated onto them, `e = V e'`.
    """
    if sampling == "sobol":
        e_u, e_r = _sobol(key, start, n, n_total, du, dr, dtype)
        rotate = lambda e, V: e if V is None else e @ V.T
        return rotate(e_u, axes[0]), rotate(e_r, axes[1])
    pairs = sampling == "antithetic"
    index = (start + jnp.arange(n)) // (2 if pairs else 1)
    draw = jax.vmap(lambda i: jr.normal(jr.fold_in(key, i), (du + dr,), dtype))(index)
    e_u, e_r = draw[:, :du], draw[:, du:]
    if pairs:  # (e_u, e_r), (e_u, -e_r): consecutive samples, so aligned even blocks keep pairs whole
        e_r = e_r * jnp.where((start + jnp.arange(n)) % 2 == 0, 1.0, -1.0).astype(dtype)[:, None]
    return e_u, e_r


def fold_axes(factors, axes, n_samples):
    """`(factors, axes)` with the Sobol axes of a coordinate folded into its square root, `W = M V`
    (and its axes then None), so that `sources` of the unrotated normals e' gives `M (V e')` in one
    product per sample instead of two, where that is cheaper: `(d, d)` factors cost d^3 to fold and
    `n_samples d^2` to rotate the samples. `axes` None (not sobol) or a coordinate without axes
    leaves its factor as it is."""
    if axes is None:
        return factors, None
    fold = lambda M, V: V is not None and V.shape[0] <= n_samples
    W = tuple(M @ V if fold(M, V) else M for M, V in zip(factors, axes))
    return W, tuple(None if fold(M, V) else V for M, V in zip(factors, axes))


def sources(e_u, e_r, M_u, M_r, T, Pa, first, last):
    """Sources `u (S, T, Pa)`, `r (S, T, Pa C)` from normals: `u = M_u e_u` (layer 1: e_u `(S, Pa)`, u
    constant in time) and `r = M_r e_r` (layer L: e_r `(S, C)`, the read-out weights of a neuron, the
    same at every time and point, and M_r the scalar sigma_w)."""
    S = e_u.shape[0]
    u = e_u @ M_u.T
    u = jnp.broadcast_to(u[:, None, :], (S, T, Pa)) if first else u.reshape(S, T, Pa)
    if last:
        C = e_r.shape[1]
        r = jnp.broadcast_to(M_r * e_r[:, None, None, :], (S, T, Pa, C)).reshape(S, T, Pa * C)
    else:
        r = (e_r @ M_r.T).reshape(S, T, -1)
    return u, r


def tdot(X, Y):
    """`X^T Y (m, n)` for samples `X (S, m)`, `Y (S, n)`. In float64 the transpose of X is made first
    (an optimization barrier keeps XLA from folding it back into the product): on the CPU, XLA's
    float64 product with a transposed operand runs at about half the speed of a copy and a plain
    product (in float32 it does not, and the copy would only cost)."""
    if X.dtype == jnp.float64:
        return jax.lax.optimization_barrier(X.T) @ Y
    return X.T @ Y


def gram(X, X0=None):
    """`X^T X - X0^T X0` for samples `X, X0 (S, M)` in one product: the symmetric part of
    `(X - X0)^T (X + X0)` (X0 None: `X^T X`)."""
    if X0 is None:
        return tdot(X, X)
    M = tdot(X - X0, X + X0)
    return 0.5 * (M + M.T)


def replica_mean(X, mesh=None):
    """The mean over the leading (replica) axis of X (`_leading_sum`; `mesh`: the mesh that axis is
    sharded over, or None)."""
    return _leading_sum(X, mesh) / X.shape[0]


def replica_std(X, mesh=None):
    """The standard deviation over the leading (replica) axis of X, with R - 1 degrees of freedom
    (`_leading_sum`; `mesh` as in `replica_mean`)."""
    mean = replica_mean(X, mesh)
    return jnp.sqrt(_leading_sum((X - mean) ** 2, mesh) / (X.shape[0] - 1))


def _leading_sum(X, mesh=None):
    """The sum over the leading axis of X by halving: the first half plus the second, until one slice
    is left. XLA's CPU reduction over a short leading axis of a large array runs many times slower
    than these elementwise additions, and a sum of all R slices at once makes XLA keep the slices as
    buffers of their own (`benchmarks/RESULTS.md`). With the axis sharded over the devices of `mesh`,
    each device sums its own slices and the partial sums are added across devices: halving the
    sharded axis would move whole halves between devices and keep them there."""
    if mesh is not None:
        return _mesh.shard(_leading_sum, mesh, reduce=True)(X)
    while X.shape[0] > 1:
        h = X.shape[0] // 2
        head = X[:h] + X[h : 2 * h]
        X = head.at[0].add(X[2 * h]) if X.shape[0] % 2 else head
    return X[0]


def stderr(per_replica):
    """Standard errors of the means over the leading (replica) axis of every array in a dict,
    `sd / sqrt(R)` (sd with R - 1 degrees of freedom). With few replicas an interval needs Student's t:
    +-t_{R-1}(0.975) stderr is a 95% interval (2.36 stderr at R = 8; +-2 stderr is 91%). Entries
    that are None are dropped."""
    return {k: replica_std(v) / v.shape[0] ** 0.5 for k, v in per_replica.items() if v is not None}
