"""The 1/N fluctuations of deep nonlinear networks with feature learning: the
propagator of the DMFT action (`_propagator`, docs/theory_extensions.md section 13) with the site
averages, their derivatives and the observables' covariance estimated from single-site samples.

Layer l's site is `h = chi + Kh g`, `z = xi + Kz phi(h)`, `g = phi'(h) z` over the n = T Pa (time,
point) pairs, with `chi ~ N(0, Phi^{l-1})`, `xi ~ N(0, G^{l+1})` and the drifts `Kh`, `Kz` of
`_propagator` (for `phi(h) = h` it is that module's linear site). Its observables are `phi phi^T`,
`g g^T`, `-phi (i zhat)^T` (alpha^l, l < L), `-(i hhat) g^T` (beta^l, l > 1) and, in layer L, the
centred predictions `(z phi - z(0) phi(0)) / gamma0`. Every sample is a deterministic function
`y(s)` of its sources `s = (chi, xi)`, so a response field is a derivative: `<F (i shat_p)> =
-E[dF/ds_p]` and `<F (i shat_p)(i shat_q)> = E[d2F/ds_p ds_q]`. From forward-mode derivatives of y:

* the averages and the fixed point q (the responses `E[dphi/dxi]`, `E[dg/dchi]` pathwise, exact per
  sample, unlike `MonteCarlo`'s Stein regression);
* `D = dE[O]/dq`: through the drifts pathwise (a drift entry acts on a sample as a shift of one of
  its sources, so these too are derivatives of y with respect to s), and through the source
  covariances by Price's theorem, `dE[O]/dK_pq = E[d2 O / ds_p ds_q] / 2` (differentiating the samples
  `K^{1/2} e` instead has the factor `1 / (s_i + s_j)` on pairs of small singular values: its noise is
  unbounded);
* `kappa`, every `E[O_A O_B] = E[D_A D_B (X_A X_B)]` with `D = d/ds_p` for a response observable.

Everything is dense: m = (4 L - 2) n^2 + n order parameters, and per sample the observables' Hessians
(third derivatives of y for the responses: n^4 values from n^3 forward passes of the site), so the
sums cost ~ `S n^5`, the dense solves ~ m^3, and this path is for small T Pa (`sampled_bytes`). The answer
is the estimate from all S samples (a randomly shifted Sobol net per group of S / `_GROUPS`, `_normals`)
less the O(1 / S) bias that `_GROUPS` independent estimates, one per group, each with its own fixed point,
show; its standard error is their spread over sqrt(_GROUPS) (the fixed point's sampling error is common to
every group of samples that shares it, and batch means around one fixed point miss it,
`benchmarks/RESULTS.md`) with that bias in quadrature (`sampled_coefficients`).
For relu, `phi''` is a delta that pathwise derivatives miss; the sites use relu smoothed by a narrow
Gaussian instead (`_smoothed_relu`), one function whose values and derivatives agree (Price's second
derivatives of `phi'(h_t) phi'(h_s)` at nearby times are large and cancel only then), at three widths,
extrapolated to width 0 (`sampled_coefficients`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import _propagator as lp
from .solvers._sampling import factor, normals, sobol_axes
from .solvers.lazy import lazy_kernels

__all__ = ["sampled_bytes", "sampled_coefficients"]

_GROUPS = 8  # independent estimates (replicas), whose spread is the standard error
_MAX_ITERS = 500  # of the fixed point's iteration, which stops at a relative change of sqrt(eps)
_MEMORY = 5  # differences the fixed point's Anderson steps combine
_CHUNK_BYTES = 100_000_000  # a chunk's temporaries: larger chunks of these small per-sample tensors run slower


def _inputs(problem, blocks, l):
    """Layer l's `(S_chi, S_xi, alpha^{l-1}, beta^{l+1}, f)`: the fixed source covariances of layer 1
    (`Kx` in every time pair) and layer L (the read-outs: ones) carry no derivative."""
    L, Kx, T = problem.depth, problem.data.Kx, problem.n_steps + 1
    n = T * Kx.shape[0]
    Phi_prev, G_next, alpha_prev, beta_next, f = lp._inputs(blocks, l, L)
    fixed = jax.lax.stop_gradient
    S_chi = fixed(jnp.kron(jnp.ones((T, T), Kx.dtype), Kx)) if l == 1 else Phi_prev
    S_xi = fixed(jnp.ones((n, n), Kx.dtype)) if l == L else G_next
    # alpha and beta enter through the pairing Hab of the action, not through D (`_propagator`)
    alpha_prev, beta_next = (None if x is None else fixed(x) for x in (alpha_prev, beta_next))
    return S_chi, S_xi, alpha_prev, beta_next, f


def _smoothed_relu(width):
    """`(phi, phi')` of relu smoothed by a Gaussian of standard deviation `width`, `E relu(h + width
    eps)`: `h Phi(h / w) + w N(h / w)` and `Phi(h / w)`, whose derivatives of every order exist, with
    `phi'' = N(h; 0, w^2)` a kernel estimate of relu's delta at the kink."""
    cdf = lambda h: _normal_cdf(h / width)
    return (lambda h: h * cdf(h) + width * jax.scipy.stats.norm.pdf(h / width)), cdf


@jax.custom_jvp
def _normal_cdf(x):
    """The standard normal CDF, differentiated as its density: the sites' nested forward-mode
    derivatives (up to the fourth) then stay a few exponentials instead of copies of `ndtr`'s
    branches (`jax.scipy.special.ndtr`)."""
    return jax.scipy.special.ndtr(x)


@_normal_cdf.defjvp
def _normal_cdf_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _normal_cdf(x), jax.scipy.stats.norm.pdf(x) * dx


def _drift(problem, f):
    """`c gamma0 [s < t] Delta_nu(s)` `(n, n)` (rows `(t mu)`, columns `(s nu)`): the part of the drifts
    `Kh`, `Kz` that multiplies the source covariances, `c = eta0 dt / P`."""
    T, Pa, dtype = problem.n_steps + 1, problem.data.Kx.shape[0], f.dtype
    c = problem.dt * problem.eta0 / problem.P
    causal = jnp.kron(jnp.tril(jnp.ones((T, T), dtype), -1), jnp.ones((Pa, Pa), dtype))
    return c * problem.gamma0 * causal * lp._error_signal(problem, f).reshape(1, T * Pa)


def _site(problem, kink_width, S_chi, S_xi, alpha_prev, beta_next, f):
    """`y(s) = (phi(h), g, z phi(h))` `(3n,)` of one sample's sources `s = (chi, xi)` `(2n,)`, solved
    forward in time (Kh strictly causal, Kz causal with its equal-time block). `kink_width` (relu; a
    scalar array, None for other activations): relu smoothed by a Gaussian of that width times each
    point's preactivation scale at t = 0 (the sqrt of `S_chi`'s diagonal), `_smoothed_relu`."""
    act, T, Pa = problem.activation, problem.n_steps + 1, problem.data.Kx.shape[0]
    fn, dfn = act.fn, act.dfn
    if kink_width is not None:
        width = kink_width * jnp.sqrt(jnp.diagonal(jax.lax.stop_gradient(S_chi))[:Pa])
        fn, dfn = _smoothed_relu(width)
    n, dtype = T * Pa, S_chi.dtype
    drift = _drift(problem, f)
    Kh = drift * S_chi + (0.0 if alpha_prev is None else alpha_prev)
    Kz = drift * S_xi + (0.0 if beta_next is None else beta_next.T)

    def y(s):
        chi, xi = s[:n], s[n:]
        phi, g, z = (jnp.zeros(n, dtype) for _ in range(3))
        for t in range(T):
            now = slice(t * Pa, (t + 1) * Pa)
            h = chi[now] + Kh[now] @ g
            phi = phi.at[now].set(fn(h))
            z = z.at[now].set(xi[now] + Kz[now] @ phi)
            g = g.at[now].set(dfn(h) * z[now])
        return jnp.concatenate([phi, g, z * phi])

    return y


def _sources(inputs, e):
    """Sources `(..., 2n)` from standard normals `e (..., 2n)`, by a square root held fixed: their
    dependence on the covariances is Price's part of D (`_chunk_sums`)."""
    n, root = inputs[0].shape[0], lambda K: factor(jax.lax.stop_gradient(K))[0]
    return jnp.concatenate([e[..., :n] @ root(inputs[0]).T, e[..., n:] @ root(inputs[1]).T], axis=-1)


def _selected(fn, groups, xs):
    """`sum_i fn(xs[i])` over the `i` of the groups `groups = (first, count)` of the leading axis (its
    `len(xs) / _GROUPS` entries per group), one at a time."""
    per_group = xs.shape[0] // _GROUPS
    fn = jax.jit(fn)  # traced once: the shapes of its sums, then the loop's body, hit jit's cache
    zeros = jax.tree.map(lambda y: jnp.zeros(y.shape, y.dtype), jax.eval_shape(fn, xs[0]))
    add = lambda i, acc: jax.tree.map(jnp.add, acc, fn(jax.lax.dynamic_index_in_dim(xs, i, keepdims=False)))
    first, count = groups
    return jax.lax.fori_loop(first * per_group, (first + count) * per_group, add, zeros)


def _observables(problem, l, y, n):
    """Layer l's observables of one sample in `_propagator._means` order (the predictions not yet
    centred): a function of s, with the responses as derivatives of y."""
    L = problem.depth

    def obs(s):
        Y = y(s)
        phi, g = Y[:n], Y[n : 2 * n]
        out = [jnp.outer(phi, phi).ravel(), jnp.outer(g, g).ravel()]
        J = jax.jacfwd(y)(s)
        if l < L:  # alpha_ab = d phi_a / d xi_b
            out.append(J[:n, n:].ravel())
        if l > 1:  # beta_ab = d g_b / d chi_a
            out.append(J[n : 2 * n, :n].T.ravel())
        if l == L:
            out.append(Y[2 * n :])
        return jnp.concatenate(out)

    return obs


def _centre_rows(problem, l, X):
    """Layer L's rows of the predictions (the last n rows of `X (n_obs, k)`) centred and over gamma0."""
    if l != problem.depth:
        return X
    n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
    return X.at[-n:].set(jax.vmap(lambda v: lp._centred(problem, v), in_axes=1, out_axes=1)(X[-n:]))


def _pair(kind_a, a, kind_b, b, Y, J, H):
    """`sum_s E-integrand of O_A O_B` `(|A|, |B|)` over a chunk, for two groups of observables of one
    kind each: "P" `(i, j)` the products `y_i y_j`, "F" `(i, None)` the values `y_i`, "R" `(i, p)` the
    responses `-y_i (i shat_p)`; `E[O_A O_B] = E[D_A D_B (X_A X_B)]` (module docstring). `Y (c, 3n)`,
    `J (c, 3n, 2n)`, `H (c, 3n, 2n, 2n)`: y and its derivatives over the chunk."""
    if kind_a == "R" and kind_b != "R":
        return _pair(kind_b, b, kind_a, a, Y, J, H).T
    value = lambda kind, x: Y[:, x[0]] * Y[:, x[1]] if kind == "P" else Y[:, x[0]]
    if kind_b != "R":
        return value(kind_a, a).T @ value(kind_b, b)
    (i, p) = b
    if kind_a != "R":  # E[d_p (X_A y_i)]
        dX = J[:, a[0]][:, :, p]
        if kind_a == "P":
            dX = dX * Y[:, a[1]][:, :, None] + Y[:, a[0]][:, :, None] * J[:, a[1]][:, :, p]
        return jnp.einsum("sab,sb->ab", dX, Y[:, i]) + value(kind_a, a).T @ J[:, i, p]
    (k, q) = a  # E[d_q d_p (y_k y_i)] = E[H_kqp y_i + J_kq J_ip + J_kp J_iq + y_k H_ipq]
    swap = lambda X: jnp.swapaxes(X, 1, 2)
    return (
        jnp.einsum("sab,sb->ab", H[:, k, q][:, :, p], Y[:, i])
        + jnp.einsum("sa,sab->ab", Y[:, k], swap(H[:, i, p][:, :, q]))
        + J[:, k, q].T @ J[:, i, p]
        + jnp.einsum("sab,sab->ab", J[:, k][:, :, p], swap(J[:, i][:, :, q]))
    )


def _kinds(problem, l, n):
    """Layer l's observables in `_means` order as `(kind, (index into y, second index))` groups."""
    L = problem.depth
    a, b = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    kinds = [("P", (a, b)), ("P", (n + a, n + b))]
    if l < L:
        kinds.append(("R", (a, n + b)))  # alpha_ab: y = phi_a, source xi_b
    if l > 1:
        kinds.append(("R", (n + b, a)))  # beta_ab: y = g_b, source chi_a
    if l == L:
        kinds.append(("F", (2 * n + np.arange(n), None)))
    return kinds


def _variables(problem, l):
    """The q blocks layer l's averages depend on through D, with the slice of its sources whose
    covariance each is (None for f, which enters through the drifts only)."""
    L, n = problem.depth, (problem.n_steps + 1) * problem.data.Kx.shape[0]
    out = [(("Phi", l - 1), slice(0, n))] if l > 1 else []
    out += [(("G", l + 1), slice(n, 2 * n))] if l < L else []
    return out + [(("f", L), None)]


def _f_derivative(problem, kink_width, l, blocks, s):
    """Summed over the samples `s (c, 2n)`: the derivative `(n_obs, n)` of layer l's observables with
    respect to the predictions f, which enter through the drifts' error signal (sources held fixed)."""
    key = ("f", problem.depth)

    def of(x, s):  # the observables of sample s as a function of f
        inputs = _inputs(problem, blocks | {key: x}, l)
        return _observables(problem, l, _site(problem, kink_width, *inputs), inputs[0].shape[0])(s)

    return jax.vmap(lambda s: jax.jacfwd(of)(blocks[key], s))(s).sum(0)


def _third(y, s, along, sources):
    """`d3 y / ds_r ds_p ds_q` `(c, 3n, n, n, n)` of the samples `s (c, 2n)`, r along the slice `along`
    of s, p and q along the slice `sources`."""
    shift = lambda where: jnp.zeros_like(s[0, where])  # a shift of those sources, zero at the samples
    J_at = lambda v, s: jax.jacfwd(lambda w: y(s.at[sources].add(v).at[along].add(w)))(shift(along))
    return jax.vmap(lambda s: jax.jacfwd(jax.jacfwd(J_at))(shift(sources), s))(s)


def _covariance_derivative(problem, l, blocks, key, sources, y, s, Y, J, H):
    """Summed over a chunk: the derivative `(n_obs, n^2)` of layer l's observables with respect to the
    q block `key`, the covariance of the `sources` slice of the sources (`Phi^{l-1}` of chi, `G^{l+1}`
    of xi), from the site y, the chunk's samples `s (c, 2n)` and its derivatives there, `Y (c, 3n)`,
    `J (c, 3n, 2n)` and `H (c, 3n, 2n, 2n)` (and the third ones the responses need, `_third`).

    The covariance also multiplies the drift: `K_ab = drift_ab X_ab` (`Kh` for Phi, `Kz` for G). Its
    entry (a, b) carries `u_b` (g_b for Kh, phi_b for Kz), fixed before the time of a, into the field
    of a, so raising it by eps shifts the source s_a by eps u_b: pathwise `dy / dK_ab = J[:, a] u_b`
    and `dJ / dK_ab = u_b H[:, :, a] + J[:, a] (grad u_b)^T`. Plus Price's theorem,
    `dE[O] / dX_pq = E[d2 O / ds_p ds_q] / 2`."""
    n = Y.shape[1] // 3
    u, du = (Y[:, n : 2 * n], J[:, n : 2 * n]) if key[0] == "Phi" else (Y[:, :n], J[:, :n])
    V, Hs = J[:, :, sources], H[:, :, sources, sources]
    carried = lambda A: jnp.einsum("ska,sb->kab", A, u)  # sum_s A[s, k, a] u_b
    path, price = [], []
    for kind, (i, j) in _kinds(problem, l, n):
        if kind == "P":  # y_i y_j
            path.append(carried(V[:, i] * Y[:, j, None] + Y[:, i, None] * V[:, j]))
            two = jnp.einsum("skp,skq->kpq", V[:, i], V[:, j])
            price.append(
                (Hs[:, i] * Y[:, j, None, None] + Y[:, i, None, None] * Hs[:, j]).sum(0) + two + two.swapaxes(1, 2)
            )
        elif kind == "R":  # the response dy_i / ds_j, j along one slice of the sources
            path.append(carried(H[:, i, j][:, :, sources]) + jnp.einsum("ska,sbk->kab", V[:, i], du[:, :, j]))
            along = slice(0, n) if j.max() < n else slice(n, 2 * n)
            price.append(_third(y, s, along, sources)[:, i, j - along.start].sum(0))
        else:  # y_i
            path.append(carried(V[:, i]))
            price.append(Hs[:, i].sum(0))
    drift = _drift(problem, blocks[("f", problem.depth)])
    out = jnp.concatenate(path) * drift + 0.5 * jnp.concatenate(price)
    return out.reshape(-1, n * n)


def _first(kind, index, Y, J):
    """Summed over the chunk: the observables of one `_kinds` group (responses: `E[dy_i / ds_p]`)."""
    i, j = index
    return (Y[:, i] * Y[:, j] if kind == "P" else J[:, i, j] if kind == "R" else Y[:, i]).sum(0)


def _chunk_sums(problem, kink_width, l, blocks, s):
    """Sums over a chunk of samples `s (c, 2n)` of layer l: `(d, m1, m2)`, d the derivatives of its
    observables with respect to its `_variables` (`_f_derivative`, `_covariance_derivative`), m1 and m2
    their first and second moments (`_pair`)."""
    inputs = _inputs(problem, blocks, l)
    y = _site(problem, kink_width, *inputs)
    Y = jax.vmap(y)(s)
    J = jax.vmap(jax.jacfwd(y))(s)
    H = jax.vmap(jax.jacfwd(jax.jacfwd(y)))(s)
    d = {}
    for key, sources in _variables(problem, l):
        if sources is None:
            d[key] = _f_derivative(problem, kink_width, l, blocks, s)
        else:
            d[key] = _covariance_derivative(problem, l, blocks, key, sources, y, s, Y, J, H)
    kinds = _kinds(problem, l, inputs[0].shape[0])
    m1 = jnp.concatenate([_first(kind, index, Y, J) for kind, index in kinds])
    m2 = jnp.block([[_pair(ka, a, kb, b, Y, J, H) for kb, b in kinds] for ka, a in kinds])
    return d, m1, m2


def _axes(problem):
    """Per layer, the Sobol axes `(V_chi, V_xi)` `(n, n)` of its sources (`solvers._sampling.sobol_axes`):
    time cosine modes times the eigenvectors of the lazy kernel of the points, in decreasing expected
    variance. chi of layer 1 has Kx's, xi of layer L (the read-out, the same at every time and point)
    the all-ones kernel's."""
    L, T, Kx = problem.depth, problem.n_steps + 1, problem.data.Kx
    Phi0, G0 = lazy_kernels(problem)[:2]
    chi = lambda l: sobol_axes(problem.net.preactivation_kernel(Kx if l == 0 else Phi0[l - 1]), T)
    xi = lambda l: sobol_axes(jnp.ones_like(Kx) if l == L - 1 else G0[l + 1], T)
    return [(chi(l), xi(l)) for l in range(L)]


def _normals(problem, key, S):
    """Standard normals `(L, S, 2n)`, layer by layer: randomised quasi-Monte Carlo. Each of the
    `_GROUPS` groups of S / _GROUPS samples (a power of 2) is a Sobol net with its own random digital
    shift, so the groups stay independent estimates, and its coordinates are rotated onto the layer's
    `_axes`, the net's best coordinates where the sources vary most. The points are drawn in float32
    and cast: the same sources in either precision, up to the rounding of the axes."""
    n, m, dtype = (problem.n_steps + 1) * problem.data.Kx.shape[0], S // _GROUPS, problem.data.Kx.dtype

    def group(key, V_chi, V_xi):
        e_chi, e_xi = normals("sobol", key, 0, m, m, n, n, (None, None), jnp.float32)
        return jnp.concatenate([e_chi.astype(dtype) @ V_chi.T, e_xi.astype(dtype) @ V_xi.T], axis=1)

    layer = lambda l, V: jax.vmap(lambda g: group(jr.fold_in(jr.fold_in(key, l), g), *V))(jnp.arange(_GROUPS))
    return jnp.stack([layer(l, V).reshape(S, 2 * n) for l, V in enumerate(_axes(problem))])


def _averages(problem, kink_width, q, e, groups):
    """The sampled map: every layer's site averages `(m,)` from the normals `e (L, G, S / G, 2n)` of the
    consecutive groups `groups = (first, count)`."""
    blocks = lp._unpack(problem, q)
    out = []
    for l in range(1, problem.depth + 1):
        inputs = _inputs(problem, blocks, l)
        obs = _observables(problem, l, _site(problem, kink_width, *inputs), inputs[0].shape[0])
        mean = _selected(lambda s, obs=obs: jax.vmap(obs)(s).mean(0), groups, _sources(inputs, e[l - 1]))
        mean = mean / groups[1]
        out.append(_centre_rows(problem, l, mean[:, None])[:, 0])
    return jnp.concatenate(out)


def _fixed_point(problem, kink_width, f, e, groups):
    """The sampled map's fixed point `q (m,)` (normals `e` and `groups` as in `_averages`) from the lazy
    kernels and the predictions f, and its last change relative to the largest order parameter, by
    Anderson acceleration (type II, unit mixing):
    each step combines the last `_MEMORY` differences of the iterates and of their residuals. The
    Jacobians of strongly feature-learning maps have complex pairs of eigenvalues outside the unit
    circle, where the plain iteration cycles and a damped one converges at a rate close to 1."""
    q = lp.lazy_start(problem, f)
    tol = jnp.finfo(q.dtype).eps ** 0.5  # far below the sampling error of any affordable S

    def body(carry):
        it, q, _, dQ, dR, q_last, r_last = carry
        new = _averages(problem, kink_width, q, e, groups)
        r = new - q
        change = jnp.max(jnp.abs(r)) / jnp.maximum(jnp.max(jnp.abs(new)), 1.0)
        slot, first = (it - 1) % _MEMORY, it == 0  # the oldest difference is replaced
        dQ = jnp.where(first, dQ, dQ.at[slot].set(q - q_last))
        dR = jnp.where(first, dR, dR.at[slot].set(r - r_last))
        gamma = jnp.linalg.lstsq(dR.T, r)[0]  # minimum norm: differences not yet filled (zero) get zero weight
        return it + 1, q + r - gamma @ (dQ + dR), change, dQ, dR, q, r

    history = jnp.zeros((_MEMORY, q.shape[0]), q.dtype)
    init = (0, q, jnp.asarray(jnp.inf, q.dtype), history, history, q, jnp.zeros_like(q))
    _, _, change, *_, q, _ = jax.lax.while_loop(lambda c: (c[0] < _MAX_ITERS) & (c[2] > tol), body, init)
    return q, change


def _group_sums(problem, kink_width, q, e, groups, chunk):
    """Per layer, the sums `(d, m1, m2)` of `_chunk_sums` over the samples of the `groups` (`e`, `groups`
    as in `_averages`), `chunk` at a time."""
    blocks = lp._unpack(problem, q)
    out = []
    for l in range(1, problem.depth + 1):
        s = _sources(_inputs(problem, blocks, l), e[l - 1]).reshape(-1, chunk, e.shape[-1])
        out.append(_selected(lambda c, l=l: _chunk_sums(problem, kink_width, l, blocks, c), groups, s))
    return out


def _covariance(problem, sums, S):
    """`N Cov(q) (m, m)` from the layers' sums over S samples: `M^-1 kappa (M^T - Hab M^-1 kappa)^-1`."""
    L, layout = problem.depth, lp._layout(problem)
    m = sum(int(np.prod(shape)) for _, shape in layout.values())
    dtype = problem.data.Kx.dtype
    D, kappas = jnp.zeros((m, m), dtype), []
    for l, (d, m1, m2) in enumerate(sums, 1):
        row = layout[lp._produced(L, l)[0]][0]
        for key, block in d.items():
            col = layout[key][0]
            D = D.at[row : row + block.shape[0], col : col + block.shape[1]].set(_centre_rows(problem, l, block / S))
        m1, m2 = m1 / S, m2 / S
        kappa = _centre_rows(problem, l, m2 - jnp.outer(m1, m1))
        kappas.append(_centre_rows(problem, l, kappa.T).T)
    M = jnp.eye(m, dtype=dtype) - D
    Mk = jnp.linalg.solve(M, jax.scipy.linalg.block_diag(*kappas))
    Hab_Mk = jax.vmap(lambda v: lp.pairing(problem, v), in_axes=1, out_axes=1)(Mk)
    return Mk @ jnp.linalg.inv(M.T - Hab_Mk)


@eqx.filter_jit
def _solve(problem, kink_width, f, key, n_samples, chunk):
    """The estimate from all n_samples samples per layer, and `_GROUPS` independent ones, each from its
    own n_samples / _GROUPS of them: `(change, pooled, groups)`, the largest last change of their fixed
    points, `(coef, F)` of `_propagator.outputs` from all the samples, and the same per group (leading
    axis `_GROUPS`). Each estimate solves its own fixed point. Every estimate is one program on the
    groups of samples it selects (`_averages`), so the program is compiled once for all of them."""
    e = _normals(problem, key, n_samples)
    e = e.reshape(e.shape[0], _GROUPS, -1, e.shape[-1])

    def one(groups):
        q, change = _fixed_point(problem, kink_width, f, e, groups)
        cov = _covariance(problem, _group_sums(problem, kink_width, q, e, groups, chunk), groups[1] * e.shape[2])
        return change, lp.outputs(problem, q, cov)

    first, count = jnp.array([*range(_GROUPS), 0]), jnp.array([1] * _GROUPS + [_GROUPS])  # each group, then all
    change, out = jax.lax.map(one, (first, count))
    groups, pooled = jax.tree.map(lambda x: x[:-1], out), jax.tree.map(lambda x: x[-1], out)
    return jnp.max(change), pooled, groups


def _per_sample_bytes(problem):
    """The per-sample temporaries of `_chunk_sums`: third derivatives of y and the observables' second
    ones, a few times n^4 values (19 n^4 at depth 2, 58 n^4 with a middle layer; fitted with `_dense_bytes`)."""
    n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
    return (19 if problem.depth == 2 else 58) * n**4 * problem.data.Kx.dtype.itemsize


def _dense_bytes(problem, n_samples):
    """The dense m x m matrices (D, kappa, the solves and their group copies, a few at a time), and the
    fixed point's per-sample site Jacobians and observables over one group's samples at a time. With
    `_per_sample_bytes`, fitted to XLA's memory analysis of `_solve` on 8 problems (depth 2-4, T Pa 4-12,
    4096-16384 samples): within 0.94-1.28 of it."""
    n, L = (problem.n_steps + 1) * problem.data.Kx.shape[0], problem.depth
    per_group = 2 * L * n * n * n_samples // _GROUPS
    return (5 * lp.order_parameters(problem) ** 2 + per_group) * problem.data.Kx.dtype.itemsize


def sampled_chunk(problem, n_samples, budget) -> int:
    """Samples processed at a time within `budget` bytes and a working set of `_CHUNK_BYTES`: a power
    of 2 dividing a group, at least 1."""
    room = min(max(budget - _dense_bytes(problem, n_samples), 0), _CHUNK_BYTES) // _per_sample_bytes(problem)
    chunk = 1
    while 2 * chunk <= room and (n_samples // _GROUPS) % (2 * chunk) == 0:
        chunk *= 2
    return chunk


def sampled_bytes(problem, n_samples, budget) -> int:
    """The memory of `sampled_coefficients` at the chunk `sampled_chunk` chooses."""
    return _dense_bytes(problem, n_samples) + sampled_chunk(problem, n_samples, budget) * _per_sample_bytes(problem)


def _estimates(problem, f, key, n_samples, chunk, kink_width):
    """`(pooled, groups)` of `_solve`, checked for convergence."""
    change, pooled, groups = _solve(problem, kink_width, f.astype(problem.data.Kx.dtype), key, n_samples, chunk)
    if not float(change) <= jnp.finfo(pooled[1].dtype).eps ** 0.5:
        raise ValueError(
            f"the sampled DMFT map did not reach its fixed point in {_MAX_ITERS} iterations (relative change "
            f"{float(change):.3g}): the problem may be at the edge of stability; use a smaller eta0 or t_max"
        )
    return pooled, groups


def sampled_coefficients(problem, f, key, n_samples, budget, kink_width=0.0):
    """The variance coefficients of `fluctuations` for a deep nonlinear network at gamma0 > 0 around
    the predictions `f (T, Pa)` of its solution: `(coef, stderr, F)` as
    `_propagator.linear_coefficients` returns them; `budget` bytes of memory. The map is causal, so D is
    nilpotent and `M^-1` a polynomial in the sampled D (as is the second inverse): one estimate's noise
    multiplied by itself biases it by O(1 / S), more the larger D (strong feature learning). `_GROUPS`
    independent estimates from S / _GROUPS samples each carry `_GROUPS` times that bias, so their mean
    estimates it as `b = (mean - pooled) / (_GROUPS - 1)`. The answer is the estimate from all the samples
    less b (the jackknife's correction, exact to first order in 1 / S); its standard error is the groups'
    spread over sqrt(_GROUPS) with b in quadrature, since where the groups are far from their limit the
    correction falls short.
    `kink_width > 0` (relu): relu smoothed at 1, 2 and 3 times that width, with the same samples,
    extrapolated to width 0 (`3 c(w) - 3 c(2 w) + c(3 w)`, estimate by estimate): the smoothing's bias is
    linear in the width, and its quadratic part is not negligible at w = 0.2."""
    m = n_samples // _GROUPS
    if n_samples % _GROUPS or m & (m - 1):
        raise ValueError(
            f"n_samples ({n_samples}) must be {_GROUPS} times a power of 2 for deep nonlinear networks (the "
            f"standard errors come from {_GROUPS} groups of samples, each a Sobol net)"
        )
    chunk = sampled_chunk(problem, n_samples, budget)
    if kink_width > 0:  # one compilation for every width: the width is traced
        w = jnp.asarray(kink_width, problem.data.Kx.dtype)
        at = [_estimates(problem, f, key, n_samples, chunk, k * w) for k in (1, 2, 3)]
        # c(w) = c(0) + a w + b w^2 + O(w^3): 3 c(w) - 3 c(2 w) + c(3 w) = c(0) + O(w^3)
        (coef, F), (groups, _) = jax.tree.map(lambda x, y, z: 3 * x - 3 * y + z, *at)
    else:
        (coef, F), (groups, _) = _estimates(problem, f, key, n_samples, chunk, None)
    bias = {k: (x.mean(0) - coef[k]) / (_GROUPS - 1) for k, x in groups.items()}
    se = {k: jnp.sqrt(jnp.var(x, axis=0, ddof=1) / _GROUPS + bias[k] ** 2) for k, x in groups.items()}
    return {k: coef[k] - bias[k] for k in coef}, se, F
