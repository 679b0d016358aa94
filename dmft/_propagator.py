"""The 1/N fluctuations of deep linear networks with feature learning: the propagator of the DMFT
action (docs/theory_extensions.md section 13, "Deep linear networks with feature learning").

Every hidden layer l of a linear network is a Gaussian single site over the n = T Pa (time, point)
pairs, time-major: `h = chi + Kh z`, `z = xi + Kz h` with `chi ~ N(0, Phi^{l-1})` (`Kx` constant in time
for l = 1), `xi ~ N(0, G^{l+1})` (the read-out, all ones, for l = L) and the strictly causal drifts

    Kh[(t mu), (s nu)] = c gamma0 [s < t] Delta_nu(s) Phi^{l-1}[(t mu), (s nu)] + alpha^{l-1}[(t mu), (s nu)],
    Kz[(t mu), (s nu)] = c gamma0 [s < t] Delta_nu(s) G^{l+1}[(t mu), (s nu)]   + beta^{l+1}[(s nu), (t mu)],

c = eta0 dt / P, with the responses `alpha^l = dh^l / dxi^l` and `beta^l(a, b) = dz^l(b) / dchi^l(a)`. The
order parameters q (every `Phi^l`, `G^l`, `alpha^l` (l < L), `beta^l` (l > 1), and the centred predictions
`f`) are site averages of the observables O (`h h^T`, `z z^T`, `-h (i zhat)^T`, `-(i hhat) z^T`,
`(z h - z(0) h(0)) / gamma0` of layer L). At width N they fluctuate with

    N Cov(q) = M^{-1} kappa (M^T - Hab M^{-1} kappa)^{-1},     M = I - dE[O] / dq,

where `kappa` is the covariance of the observables within each site (Isserlis' theorem on the site's
fields and response fields, `<v (i vhat)^T> = -(I - K)^{-1}`, `<(i vhat) (i vhat)^T> = 0`), and `Hab`
pairs `alpha^l` with `beta^{l+1}` (the term `alpha^l . beta^{l+1}` of the action, which the average over
`W^l(0)` leaves). There are m = (4 L - 2) n^2 + n order parameters, so nothing of size m^2 is formed:
the covariance is applied to the few directions the outputs need (the predictions, the NTK entries),
each by a Krylov solve (GMRES) of the equivalent sparse system

    [[M^T, -Hab], [-kappa, M]] [y; z] = [g; 0],     z = N Cov(q) g,

whose products are a forward and a reverse derivative of the site averages (`M`, `M^T`), and kappa
applied by Isserlis' theorem in O(n^3) (`_kappa`): memory O(m) per direction, time O(L n^3) per product.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "linear_bytes",
    "linear_coefficients",
    "losses",
    "order_parameters",
    "outputs",
    "lazy_start",
    "pairing",
    "shift_coefficients",
    "symmetric",
]

_RESTART = 40  # GMRES's Krylov basis per restart
_CHUNK = 16  # directions solved at once (vmapped)


def _tolerance(dtype):
    """GMRES's relative residual: well above the round-off of the products in either precision."""
    return 1e-10 if dtype == jnp.float64 else 1e-5


def order_parameters(problem) -> int:
    """m = (4 L - 2) n^2 + n: every Phi^l and G^l, alpha^l (l < L) and beta^l (l > 1) over the n = T Pa
    (time, point) pairs, and the predictions f."""
    n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
    return (4 * problem.depth - 2) * n * n + n


def linear_bytes(problem) -> int:
    """The memory of `linear_coefficients`: its k directions (every prediction and NTK entry mu <= nu) and
    their solutions, and the Krylov solves of `_CHUNK` directions at once, each a basis of `_RESTART`
    vectors of the 2m unknowns plus a few more (`order_parameters`). The coefficients are fitted to XLA's
    memory analysis on 9 problems (depth 2-4, T Pa 12-36): within 0.98-1.03 of it."""
    T, P = problem.n_steps + 1, problem.P
    n, m = T * problem.data.Kx.shape[0], order_parameters(problem)
    k = n + T * P * (P + 1) // 2
    return int((3.8 * k + 4.7 * _CHUNK * (_RESTART + 6)) * m * problem.data.Kx.dtype.itemsize)


def _produced(L, l):
    """`(name, layer)` of the blocks of q that layer l's site averages, in `_observables` order."""
    alpha, beta, f = [("alpha", l)] * (l < L), [("beta", l)] * (l > 1), [("f", L)] * (l == L)
    return [("Phi", l), ("G", l), *alpha, *beta, *f]


def _names(L):
    """`(name, layer)` of every block of q, in order: layer by layer, `f` last."""
    return [key for l in range(1, L + 1) for key in _produced(L, l)]


def _error_signal(problem, f):
    """`Delta (T, Pa)` of the centred predictions `f (T Pa,)`: `-dl/df` on train points, 0 on test points."""
    P, f = problem.P, f.reshape(-1, problem.data.Kx.shape[0])
    Delta = problem.loss.delta(f[:, :P, None], problem.data.Y)[..., 0]
    return jnp.zeros_like(f).at[:, :P].set(Delta)


def _site(problem, l, Phi_prev, G_next, alpha_prev, beta_next, f):
    """The covariance `(4n, 4n)` of layer l's fields and response fields `X = (h, z, i hhat, i zhat)`."""
    Kx, L, T, Pa = problem.data.Kx, problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0]
    n, dtype = T * Pa, Kx.dtype
    c = problem.dt * problem.eta0 / problem.P
    causal = jnp.kron(jnp.tril(jnp.ones((T, T), dtype), -1), jnp.ones((Pa, Pa), dtype))
    drift = c * problem.gamma0 * causal * _error_signal(problem, f).reshape(1, n)
    ones, tiled = jnp.ones((n, n), dtype), jnp.kron(jnp.ones((T, T), dtype), Kx)
    S_chi = tiled if l == 1 else Phi_prev
    S_xi = ones if l == L else G_next
    Kh = drift * S_chi + (0.0 if l == 1 else alpha_prev)
    Kz = drift * S_xi + (0.0 if l == L else beta_next.T)
    eye = jnp.eye(n, dtype=dtype)
    R = jnp.linalg.inv(jnp.block([[eye, -Kh], [-Kz, eye]]))  # responses of (h, z) to their equations
    C = R @ jax.scipy.linalg.block_diag(S_chi, S_xi) @ R.T
    return jnp.block([[C, -R], [-R.T, jnp.zeros_like(C)]])


def _observables(L, l, n):
    """Layer l's observables as bilinears `sign * X[p] X[q]` of `_site`'s X: `{name: (p, q, sign)}`;
    "f" is `z h` at equal (time, point), which `_centred` turns into the predictions."""
    a, b = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    h, z, hhat, zhat = 0, n, 2 * n, 3 * n
    obs = {"Phi": (h + a, h + b, 1.0), "G": (z + a, z + b, 1.0)}
    if l < L:
        obs["alpha"] = (h + a, zhat + b, -1.0)
    if l > 1:
        obs["beta"] = (hhat + a, z + b, -1.0)
    if l == L:
        obs["f"] = (z + np.arange(n), h + np.arange(n), 1.0)
    return obs


def _centred(problem, zh):
    """`(z h - z(0) h(0)) / gamma0` over (time, point) of `zh (n,)`: the predictions' observable."""
    Pa = problem.data.Kx.shape[0]
    zh = zh.reshape(-1, Pa)
    return ((zh - zh[:1]) / problem.gamma0).ravel()


def _means(problem, l, X):
    """The site averages of layer l's observables, concatenated in `_names` order."""
    out = []
    for name, (p, q, sign) in _observables(problem.depth, l, X.shape[0] // 4).items():
        m = sign * X[p, q]
        out.append(_centred(problem, m) if name == "f" else m)
    return jnp.concatenate(out)


def _kappa(problem, l, X, v):
    """The covariance of layer l's observables (`_means` order) applied to `v`, by Isserlis' theorem:
    for bilinears `O_j = s_j X_p X_q` of a Gaussian X with covariance C, `Cov(O_j, O_k) = s_j s_k (C_pr C_qs
    + C_ps C_qr)`, so `(kappa v)_j = 2 s_j (C B C)_pq` with `B = sum_k s_k v_k (e_r e_s^T + e_s e_r^T) / 2`."""
    L, n = problem.depth, X.shape[0] // 4
    obs = _observables(L, l, n)
    p = np.concatenate([o[0] for o in obs.values()])
    q = np.concatenate([o[1] for o in obs.values()])
    s = jnp.asarray(np.concatenate([np.full(len(o[0]), o[2]) for o in obs.values()]), X.dtype)
    if l == L:  # the last n observables are z h, centred and over gamma0 (`_centred`): kappa -> E kappa E^T
        v = v.at[-n:].set(_centred_transpose(problem, v[-n:]))
    w = s * v / 2
    B = jnp.zeros_like(X).at[p, q].add(w).at[q, p].add(w)
    out = 2 * s * (X @ B @ X)[p, q]
    return out.at[-n:].set(_centred(problem, out[-n:])) if l == L else out


def _centred_transpose(problem, v):
    """The transpose of `_centred` applied to `v (n,)`: `(v - [t = 0] sum_t v(t)) / gamma0`."""
    Pa = problem.data.Kx.shape[0]
    v = v.reshape(-1, Pa)
    return (v.at[0].add(-v.sum(0)) / problem.gamma0).ravel()


def _layout(problem):
    """`{(name, layer): (start, shape)}` of the blocks of the flat order parameters q, in `_names` order:
    matrices `(n, n)`, f `(n,)`."""
    n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
    layout, start = {}, 0
    for key in _names(problem.depth):
        shape = (n,) if key[0] == "f" else (n, n)
        layout[key] = (start, shape)
        start += int(np.prod(shape))
    return layout


def _unpack(problem, q):
    """`{(name, layer): block}` of the flat order parameters `q (m,)` (`_layout`)."""
    return {key: q[s : s + int(np.prod(shape))].reshape(shape) for key, (s, shape) in _layout(problem).items()}


def _inputs(blocks, l, L):
    """Layer l's site inputs `(Phi^{l-1}, G^{l+1}, alpha^{l-1}, beta^{l+1}, f)` from `blocks` (None where
    the layer has none)."""
    get = lambda name, k: blocks[(name, k)] if 1 <= k <= L and (name, k) in blocks else None
    return get("Phi", l - 1), get("G", l + 1), get("alpha", l - 1), get("beta", l + 1), blocks[("f", L)]


def _sweep(problem, q, update_f=True):
    """One Gauss-Seidel sweep of the closure over the layers, 1 to L, on the flat `q`; with `update_f`
    False the predictions stay as they are."""
    L = problem.depth
    blocks = _unpack(problem, q)
    for l in range(1, L + 1):
        means = _means(problem, l, _site(problem, l, *_inputs(blocks, l, L)))
        keys = _produced(L, l)
        parts = jnp.split(means, np.cumsum([blocks[key].size for key in keys])[:-1])
        for key, part in zip(keys, parts):
            if key[0] != "f" or update_f:
                blocks[key] = part.reshape(blocks[key].shape)
    return jnp.concatenate([blocks[key].ravel() for key in _names(L)])


@eqx.filter_jit
def lazy_start(problem, f):
    """The flat order parameters `q (m,)` of the lazy start: `Kx` in every time pair for each Phi^l,
    ones for each G^l, zero responses, and the predictions `f` (T Pa entries)."""
    L, Kx, T = problem.depth, problem.data.Kx, problem.n_steps + 1
    n = T * Kx.shape[0]
    start = {("f", L): f.ravel()}
    for l in range(1, L + 1):
        start[("Phi", l)], start[("G", l)] = jnp.kron(jnp.ones((T, T), Kx.dtype), Kx), jnp.ones((n, n), Kx.dtype)
    return jnp.concatenate(
        [start.get(key, jnp.zeros(n if key[0] == "f" else (n, n), Kx.dtype)).ravel() for key in _names(L)]
    )


def pairing(problem, v):
    """Hab applied to `v (m,)`: the pairing of alpha^l with beta^{l+1} in the action swaps those blocks."""
    n2 = ((problem.n_steps + 1) * problem.data.Kx.shape[0]) ** 2
    layout, out = _layout(problem), jnp.zeros_like(v)
    for l in range(1, problem.depth):
        a, b = layout[("alpha", l)][0], layout[("beta", l + 1)][0]
        out = out.at[a : a + n2].set(v[b : b + n2]).at[b : b + n2].set(v[a : a + n2])
    return out


def _fixed_point(problem, f):
    """The closure's fixed point `q (m,)` for the predictions `f (T, Pa)` of its solution. With the error
    signal held at f's, every block is causal in time and within a time the backward fields pass down one
    layer per sweep, so L (T + 1) sweeps from the lazy start reach the kernels and responses exactly
    (letting f move from a wrong start instead can overflow at late times). The change of one more
    sweep, f included, is returned as a check."""
    L, T = problem.depth, problem.n_steps + 1
    q = jax.lax.fori_loop(0, L * (T + 1), lambda i, q: _sweep(problem, q, update_f=False), lazy_start(problem, f))
    return q, jnp.max(jnp.abs(_sweep(problem, q) - q))


def _operators(problem, q):
    """`(M, M^T, kappa, Hab)` at the fixed point `q (m,)` as functions of a vector `(m,)` (module docstring)."""
    L = problem.depth
    layout = _layout(problem)
    blocks = _unpack(problem, q)
    fixed = jax.lax.stop_gradient  # alpha and beta enter through Hab, not through D

    def averages(q):
        b = _unpack(problem, q)
        out = []
        for l in range(1, L + 1):
            Phi_prev, G_next, alpha_prev, beta_next, f = _inputs(b, l, L)
            alpha_prev, beta_next = (None if x is None else fixed(x) for x in (alpha_prev, beta_next))
            out.append(_means(problem, l, _site(problem, l, Phi_prev, G_next, alpha_prev, beta_next, f)))
        return jnp.concatenate(out)

    _, D = jax.linearize(averages, q)
    DT = jax.linear_transpose(D, q)
    sites = [(_site(problem, l, *_inputs(blocks, l, L)), layout[_produced(L, l)[0]][0]) for l in range(1, L + 1)]
    ends = [start for _, start in sites[1:]] + [q.shape[0]]

    def kappa(v):  # block diagonal over the layers
        return jnp.concatenate([_kappa(problem, l, X, v[a:b]) for l, ((X, a), b) in enumerate(zip(sites, ends), 1)])

    return (lambda v: v - D(v)), (lambda v: v - DT(v)[0]), kappa, (lambda v: pairing(problem, v))


@eqx.filter_jit
def _covariance(problem, q, directions):
    """`N Cov(q) g` for every row g of `directions (k, m)`, and the relative residual of each solve."""
    M, MT, kappa, Hab = _operators(problem, q)
    m = q.shape[0]
    tol = _tolerance(q.dtype)

    def A(x):
        y, z = x[:m], x[m:]
        return jnp.concatenate([MT(y) - Hab(z), M(z) - kappa(y)])

    def one(g):
        b = jnp.concatenate([g, jnp.zeros_like(g)])
        # Modified Gram-Schmidt ("incremental"): with the classical one ("batched") the basis loses its
        # orthogonality in float32, and solves stall short of the tolerance until maxiter.
        x, _ = jax.scipy.sparse.linalg.gmres(
            A, b, tol=tol, atol=0.0, restart=_RESTART, maxiter=50, solve_method="incremental"
        )
        return x[m:], jnp.linalg.norm(A(x) - b) / jnp.maximum(jnp.linalg.norm(b), jnp.finfo(b.dtype).tiny)

    k = directions.shape[0]
    chunks = jnp.pad(directions, ((0, -k % _CHUNK), (0, 0))).reshape(-1, _CHUNK, m)
    z, residual = jax.lax.map(jax.vmap(one), chunks)
    return z.reshape(-1, m)[:k], residual.ravel()[:k]


def _ntk(problem, q):
    """The train NTK `(T, P, P)` of the order parameters `q` (THEORY 2: `sum_l G^{l+1} Phi^l` at equal times)."""
    L, Kx, P, T = problem.depth, problem.data.Kx, problem.P, problem.n_steps + 1
    Pa = Kx.shape[0]
    blocks = _unpack(problem, q)
    eq = lambda X: jnp.stack([X[t * Pa : t * Pa + P, t * Pa : t * Pa + P] for t in range(T)])
    K = eq(blocks[("G", 1)]) * Kx[None, :P, :P] + eq(blocks[("Phi", L)])
    for l in range(1, L):
        K = K + eq(blocks[("G", l + 1)]) * eq(blocks[("Phi", l)])
    return K


def linear_coefficients(problem, f):
    """The variance coefficients of `fluctuations` for a deep linear network at gamma0 > 0 around the
    closure's predictions `f (T, Pa)`: `(coef, stderr, F)` as `fluctuations._coefficients` returns them
    (exact: the standard errors are 0)."""
    change, scale, residual, coef, F = _linear(problem, f.astype(problem.data.Kx.dtype))
    if not float(change) <= 1e-4 * float(scale):
        raise ValueError(
            f"sol does not solve this problem: the deep linear closure driven by its predictions moves them "
            f"by {float(change):.3g} (scale {float(scale):.3g}); pass the Problem the Solution was solved for, and "
            "the dmft.LinearClosure() solution (a Monte Carlo one is off by its sampling error)"
        )
    tol = _tolerance(F.dtype)
    if not float(residual.max()) <= 10 * tol:
        raise ValueError(
            f"the propagator's Krylov solves did not converge (relative residual {float(residual.max()):.3g}, "
            f"tolerance {tol:.0e}): the closure's fixed point may be at the edge of stability; use a smaller "
            "eta0 or t_max"
        )
    return coef, {name: jnp.zeros_like(x) for name, x in coef.items()}, F


@eqx.filter_jit
def _linear(problem, f):
    """`linear_coefficients` in one compiled program: the fixed point's last change and scale, the
    Krylov solves' largest relative residual, `coef` and `F`."""
    q, change = _fixed_point(problem, f.ravel())
    n = f.size
    dK, upper = _ntk_directions(problem, q)
    directions = jnp.concatenate([jnp.eye(n, q.shape[0], q.shape[0] - n, dtype=q.dtype), dK])
    z, residual = _covariance(problem, q, directions)
    var = jnp.einsum("km,km->k", dK, z[n:])
    coef, F = _outputs(problem, q, z[:n, q.shape[0] - n :], var, upper)
    return change, jnp.max(jnp.abs(q)), residual, coef, F


def _ntk_directions(problem, q):
    """The gradients `(k, m)` of every train NTK entry with mu <= nu (the NTK is symmetric) over time
    with respect to q, and those index pairs."""
    upper = np.triu_indices(problem.P)
    ntk = lambda q: _ntk(problem, q)[:, upper[0], upper[1]].ravel()
    _, ntk_vjp = jax.vjp(ntk, q)
    k = (problem.n_steps + 1) * len(upper[0])
    return jax.vmap(lambda e: ntk_vjp(e)[0])(jnp.eye(k, dtype=q.dtype)), upper


def losses(problem):
    """`(name, value, points)` of each loss with targets: "loss" over the train points, "loss_test" over
    the test points; `value(f (points,))` is the loss of the predictions at one time."""
    data, P, loss = problem.data, problem.P, problem.loss
    out = []
    for name, Y, points in (("loss", data.Y, slice(None, P)), ("loss_test", data.Y_test, slice(P, None))):
        if Y is not None:
            out.append((name, lambda f, Y=Y: loss.value(f[:, None], Y), points))
    return out


def shift_coefficients(problem, f, shift, cov):
    """The mean-shift coefficients of `fluctuations` from the predictions `f (T, Pa)`, their shift
    `N E[f_N - f] (T, Pa)` and their equal-time covariance `N Cov(f(t)) (T, Pa, Pa)`: `f_bias (T, Pa, 1)`
    and each loss's `<name>_bias (T,)` (`losses`), its first-order shift plus its curvature on the
    covariance, `(1/2) tr(d^2 l / df^2 N Cov(f))`."""
    coef = {"f_bias": shift[..., None]}
    for name, value, points in losses(problem):
        F, b, C = f[:, points], shift[:, points], cov[:, points, points]
        curvature = jax.vmap(lambda f, C, value=value: jnp.vdot(jax.hessian(value)(f), C))(F, C)
        coef[f"{name}_bias"] = jnp.einsum("tp,tp->t", jax.vmap(jax.grad(value))(F), b) + 0.5 * curvature
    return coef


def _outputs(problem, q, C_f, ntk_var, upper):
    """`(coef, F)` of `fluctuations`: the variance coefficients of the predictions, the losses' covariances
    over time and the NTK entries' variances from `C_f = N Cov(f) (n, n)` and `ntk_var` (`_ntk_directions`
    order), with the predictions `F (T, P, 1)` of the fixed point q."""
    P, T, Pa = problem.P, problem.n_steps + 1, problem.data.Kx.shape[0]
    m, n = q.shape[0], T * Pa
    F = q[m - n :].reshape(T, Pa)
    coef = {"f": jnp.diagonal(C_f).reshape(T, Pa, 1)}
    for name, value, points in losses(problem):
        g = jax.vmap(jax.grad(value))(F[:, points])  # (T, points)
        g = jnp.zeros((T, Pa), q.dtype).at[:, points].set(g)
        G = jnp.einsum("ts,tp->tsp", jnp.eye(T, dtype=q.dtype), g).reshape(T, n)  # d loss(t) / d f
        coef[name] = G @ C_f @ G.T
    coef["ntk"] = symmetric(ntk_var.reshape(T, -1), upper, P)
    return coef, F[:, :P, None]


def symmetric(x, upper, size):
    """The symmetric matrices `(..., size, size)` whose upper triangles, at the indices `upper`
    (`triu_indices(size)`), are `x (..., len(upper[0]))`."""
    full = jnp.zeros((*x.shape[:-1], size, size), x.dtype)
    return full.at[..., upper[0], upper[1]].set(x).at[..., upper[1], upper[0]].set(x)


def outputs(problem, q, cov):
    """`_outputs` from the dense `N Cov(q) (m, m)`."""
    n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
    dK, upper = _ntk_directions(problem, q)
    return _outputs(problem, q, cov[-n:, -n:], jnp.einsum("km,mn,kn->k", dK, cov, dK), upper)
