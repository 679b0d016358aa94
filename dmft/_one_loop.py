"""The O(1/N) mean shift of deep linear networks with feature learning: the one-loop term of the DMFT
action (docs/theory_extensions.md section 13, "The mean shift of linear networks").

With x = (q, eta) the order parameters and their conjugates shifted by their saddle values, the width-N
density is `exp(N S(x))`,

    S(x) = eta . q + (1/2) q . Hab q + sum_l K_l(eta^l; q),     K_l = ln E_l[exp(-eta^l . O^l)],

where `E_l` is layer l's Gaussian site (`_propagator._site`) with its responses alpha^{l-1}, beta^{l+1}
held at the saddle (they enter the site through the conjugates, whose shift eta is the variable here).
For bilinear observables `O_j = s_j X_p X_q` of the site's formal Gaussian X (covariance `C`, Isserlis'
theorem with response fields), `K_l = -(1/2) ln det(I + C B(eta))` with `B` symmetric and linear in eta.
Its second derivatives are the propagator's blocks (`S'' = [[Hab, M^T], [M, kappa]]`,
`N Cov(q) = -(S''^-1)_qq`), and expanding `exp(N S)` to third order around the saddle gives the mean

    N E[x - x*] -> (1/2) (S''^-1) v,     v_b = sum_cd S'''_bcd (S''^-1)_cd,

(a Gaussian's fourth moments contracted with the cubic term: the tadpole). Only K has third derivatives.
Everything is dense, 2m x 2m with m = (4 L - 2) n^2 + n order parameters over n = T Pa (time, point)
pairs, so this is for small grids (`ONE_LOOP_MAX`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._propagator import (
    _centred_transpose,
    _fixed_point,
    _inputs,
    _layout,
    _produced,
    _site,
    _unpack,
    order_parameters,
    pairing,
    shift_coefficients,
)

__all__ = ["ONE_LOOP_MAX", "bias_coefficients", "mean_shift", "one_loop_bytes", "one_loop_size"]

ONE_LOOP_MAX = 8192  # the largest 2m for which `dmft.fluctuations` computes the mean shift (dense 2m x 2m)
_CHUNK = 64  # columns of the Hessian, or of its inverse contracted with the third derivatives, at once


def one_loop_size(problem) -> int:
    """2m, the side of the dense matrices of `mean_shift`."""
    return 2 * order_parameters(problem)


def one_loop_bytes(problem) -> int:
    """The memory of `mean_shift`: three dense 2m x 2m matrices (the Hessian, its inverse and the
    inversion's workspace; XLA's memory analysis: 2.5-3.0 of them at 2m = 1752 ... 6960)."""
    return 3 * one_loop_size(problem) ** 2 * problem.data.Kx.dtype.itemsize


def _sources(problem, l, eta):
    """`B (4n, 4n)` with `eta . O = (1/2) X^T B X` for layer l's observables (`_propagator._observables`:
    Phi `h h^T`, G `z z^T`, alpha `-h (i zhat)^T`, beta `-(i hhat) z^T`, f `z h` centred) over
    `X = (h, z, i hhat, i zhat)`, from `eta` in `_produced` order."""
    L, n = problem.depth, (problem.n_steps + 1) * problem.data.Kx.shape[0]
    keys = [name for name, _ in _produced(L, l)]
    sizes = [n if name == "f" else n * n for name in keys]
    parts = dict(zip(keys, jnp.split(eta, np.cumsum(sizes)[:-1])))
    W = {name: x.reshape(n, n) for name, x in parts.items() if name != "f"}
    Z = jnp.zeros((n, n), eta.dtype)
    blocks = [[Z] * 4 for _ in range(4)]  # rows and columns: h, z, i hhat, i zhat
    blocks[0][0], blocks[1][1] = W["Phi"] + W["Phi"].T, W["G"] + W["G"].T
    if "alpha" in W:
        blocks[0][3], blocks[3][0] = -W["alpha"], -W["alpha"].T
    if "beta" in W:
        blocks[2][1], blocks[1][2] = -W["beta"], -W["beta"].T
    if "f" in parts:
        blocks[1][0] = blocks[0][1] = jnp.diag(_centred_transpose(problem, parts["f"]))
    return jnp.block(blocks)


def _variables(problem, l, m):
    """`(k,)` indices into x = (q, eta) of what layer l's `K_l` depends on: its inputs Phi^{l-1},
    G^{l+1} and f (the error signal's) in q, then its own conjugates eta^l."""
    L, layout = problem.depth, _layout(problem)
    span = lambda key: np.arange(layout[key][0], layout[key][0] + int(np.prod(layout[key][1])))
    inputs = [key for key in (("Phi", l - 1), ("G", l + 1), ("f", L)) if key in layout]
    return np.concatenate([span(key) for key in inputs] + [m + span(key) for key in _produced(L, l)])


def _generating(problem, q0, l):
    """`K_l` of the module docstring as a function of `x (2m,)`, with the responses fixed at those of the
    saddle `q0 (m,)`."""
    L, m = problem.depth, q0.shape[0]
    saddle = _unpack(problem, q0)
    start = _layout(problem)[_produced(L, l)[0]][0]
    size = sum(saddle[key].size for key in _produced(L, l))

    def K(x):
        Phi_prev, G_next, _, _, f = _inputs(_unpack(problem, x[:m]), l, L)
        _, _, alpha_prev, beta_next, _ = _inputs(saddle, l, L)
        C = _site(problem, l, Phi_prev, G_next, alpha_prev, beta_next, f)
        B = _sources(problem, l, x[m + start : m + start + size])
        return -0.5 * jnp.linalg.slogdet(jnp.eye(C.shape[0], dtype=C.dtype) + C @ B)[1]

    return K


def _by_columns(fn, k):
    """`fn(c)` for the column indices c = 0 ... k - 1, vmapped over `_CHUNK` of them at a time (memory)."""
    cols = jnp.arange(-(-k // _CHUNK) * _CHUNK)
    return jax.lax.map(jax.vmap(fn), cols.reshape(-1, _CHUNK)).reshape(len(cols), -1)[:k]


def _hvp(K, y, p):
    return jax.jvp(jax.grad(K), (y,), (p,))[1]


def _hessian(K, y0):
    """`K''(y0) (k, k)`, column by column."""
    return _by_columns(lambda c: _hvp(K, y0, jnp.zeros_like(y0).at[c].set(1.0)), len(y0))


def _contracted_third(K, y0, P):
    """`v_b = sum_cd K'''_bcd P_cd (k,)` at `y0 (k,)` for a symmetric `P (k, k)`: the gradients of the
    terms `(K'' P[:, c])_c`, summed."""
    return _by_columns(lambda c: jax.grad(lambda y: _hvp(K, y, P[:, c])[c])(y0), len(y0)).sum(0)


@eqx.filter_jit
def mean_shift(problem, f):
    """The one-loop mean shift around the closure's predictions `f (T, Pa)`:
    `(N E[f_N - f] (n,), N Cov(f) (n, n))`, both over the (time, point) pairs, time-major.

    Each `K_l` depends on a few blocks of x only (`_variables`), so its second and third derivatives
    are taken over those."""
    q0, _ = _fixed_point(problem, f.ravel())
    m, n = q0.shape[0], f.size
    x0 = jnp.concatenate([q0, jnp.zeros_like(q0)])
    eye = jnp.eye(m, dtype=q0.dtype)
    H = jnp.block([[jax.vmap(lambda e: pairing(problem, e))(eye), eye], [eye, jnp.zeros_like(eye)]])
    layers = []
    for l in range(1, problem.depth + 1):
        idx, K = _variables(problem, l, m), _generating(problem, q0, l)
        layers.append((idx, lambda y, K=K, idx=idx: K(x0.at[idx].set(y))))
        H = H.at[np.ix_(idx, idx)].add(_hessian(layers[-1][1], x0[idx]))
    Hinv = jnp.linalg.inv(H)
    v = jnp.zeros_like(x0)
    for idx, K in layers:
        v = v.at[idx].add(_contracted_third(K, x0[idx], Hinv[np.ix_(idx, idx)]))
    shift = 0.5 * Hinv[m - n : m] @ v
    return shift, -Hinv[m - n : m, m - n : m]


def bias_coefficients(problem, f):
    """The mean-shift coefficients of `fluctuations` around the closure's predictions `f (T, Pa)`
    (`shift_coefficients`)."""
    T, Pa = problem.n_steps + 1, problem.data.Kx.shape[0]
    shift, cov = mean_shift(problem, f)
    cov = jnp.diagonal(cov.reshape(T, Pa, T, Pa), axis1=0, axis2=2).transpose(2, 0, 1)  # (T, Pa, Pa) equal times
    return shift_coefficients(problem, f, shift.reshape(T, Pa), cov)
