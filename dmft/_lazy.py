"""Finite-width fluctuations of deep networks in the lazy limit (docs/theory_extensions.md section 13,
"Deeper networks in the lazy limit").

At gamma0 -> 0 the NTK of a centred network keeps its initial value `K_N` and gradient descent is the
Euler rule with it, `f_N = euler_predictions(K_N)`. At t = 0 the layers are sampled one after another:
given layer l - 1, the N preactivations of layer l are i.i.d. `N(0, Phi~^{l-1}_N)`, so each kernel is
the Gaussian expectation at the kernel below plus the sample-mean noise of the layer's N neurons,

    Phi^l_N = E[phi phi^T](Phi~^{l-1}_N) + xi_Phi^l,    G^l_N = sigma_w^2 G^{l+1}_N * Gdot^l_N + xi_G^l,

with `Gdot^l_N = <phi' phi'^T>_N` and `K_N = sum_l G^{l+1}_N * Phi~^l_N`. Each neuron's noise, carried
through the recursion to first order (`_propagate`, Price's theorem), is its influence on every kernel
and on f. `lazy_coefficients`: the covariances, as the influences' second moments. `lazy_bias`: the
O(1/N) mean shift, the recursion to second order (Price's theorem at second order, the influences'
covariances inside the products of kernels, and the backward pass's reuse of the forward weights).
"""

from __future__ import annotations

import functools
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from . import _xla
from ._propagator import shift_coefficients
from .activations import ReLU
from .dynamics import euler_predictions
from .solvers._sampling import factor
from .solvers.lazy import lazy_kernels

__all__ = ["BIAS_GROUPS", "lazy_bias", "lazy_bytes", "lazy_coefficients", "moments", "normal"]

BIAS_GROUPS = 8  # independent estimates of the mean shift; their spread is its standard error


def normal(key, shape, dtype):
    """Standard normals drawn in float32 and cast: the same neurons in either precision."""
    return jr.normal(key, shape, jnp.float32).astype(dtype)


def moments(out):
    """Per-chunk sums of the second and fourth moments: elementwise for f and the NTK, over pairs of
    times for the losses."""
    sums = {}
    for name, x in out.items():
        if name.startswith("loss"):
            x2 = x[:, :, None] * x[:, None, :]
        else:
            x2 = x**2
        sums[name] = (x2.sum(0), (x2**2).sum(0))
    return sums


def _price(A, B, dS):
    """`d E[a(u_c) b(u_d)]` along a change `dS` of the covariance of u (Price's theorem):
    `A_cd dS_cc / 2 + B_cd dS_cd + A_dc dS_dd / 2` with `A = E[a'' b]`, `B = E[a' b']`."""
    d = jnp.diagonal(dS)
    return 0.5 * A * d[:, None] + B * dS + 0.5 * A.T * d[None, :]


def _price2(M, C):
    """The mean second-order change `E d^2 E[a(u_c) b(u_d)] (Pa, Pa)` for a random change dS of the
    covariance of u with `E[dS_ab dS_cd] = C (Pa, Pa, Pa, Pa)`: Price's theorem twice,
    `(1/4) sum_abcd C_abcd E[d_a d_b d_c d_d a(u_c) b(u_d)]`, where only indices in {c, d} count and
    k of them equal to c give `M[k] = E[a^(k)(u) b^(4-k)(u)^T]`."""
    idx = jnp.arange(C.shape[0])
    pick = (idx[:, None], idx[None, :])  # slot 0: the row point c, slot 1: the column point d
    return sum(C[tuple(pick[i] for i in t)] * M[t.count(0)] for t in itertools.product((0, 1), repeat=4)) / 4


def _relu_curvature(S, C):
    """relu's `_price2` for both kernel maps `(E[phi phi^T], E[phi' phi'^T])`: the mean second-order
    change `E d^2 F(S)[dS, dS] (Pa, Pa)` for a random change dS of the covariance S of u with
    `E[dS_ab dS_cd] = C (Pa, Pa, Pa, Pa)`, from the arc-cosine kernels' own second derivatives (phi's
    higher derivatives are deltas). Entry (c, d) depends on S_cc, S_dd and S_cd alone: its 3 x 3
    Hessian in them, by autodiff of the closed form, contracted with their covariance. The diagonal is
    `S_cc / 2` and `1 / 2`, and a pair of parallel (antiparallel) inputs has the diagonal's kernels (0):
    no curvature in either, where the Hessian in three variables diverges."""
    Pa = S.shape[0]
    c, d = jnp.meshgrid(jnp.arange(Pa), jnp.arange(Pa), indexing="ij")
    idx = ((c, c), (d, d), (c, d))
    cov = jnp.stack([jnp.stack([C[i + j] for j in idx], -1) for i in idx], -2)  # (Pa, Pa, 3, 3)
    cos = S / jnp.sqrt(jnp.diagonal(S)[:, None] * jnp.diagonal(S)[None, :])
    parallel = 1 - jnp.abs(cos) <= jnp.finfo(S.dtype).eps ** 0.5  # the diagonal included
    x = jnp.stack([S[c, c], S[d, d], jnp.where(parallel, 0.0, S)], -1)  # (Pa, Pa, 3), finite everywhere
    entry = lambda x, k: ReLU().kernels(jnp.array([[x[0], x[2]], [x[2], x[1]]]))[k][0, 1]
    # forward over forward: the 2 x 2 matrix's diagonal entries have infinite derivatives (theta = 0),
    # which reverse mode would multiply by their zero cotangents into NaN
    hessian = lambda k: jax.vmap(jax.vmap(jax.jacfwd(jax.jacfwd(functools.partial(entry, k=k)))))(x)
    return tuple(jnp.where(parallel, 0.0, jnp.sum(hessian(k) * cov, (-2, -1))) for k in range(2))


def _relu_price(S, dS):
    """relu's `(d E[phi(u) phi(u)^T], d E[phi'(u) phi'(u)^T])` along a change `dS` of the covariance S
    of u, in closed form (`_price` with phi'' a delta: `E[delta(u_c) relu(u_d)] = sqrt(S_cc S_dd -
    S_cd^2) / (2 pi S_cc)`; the derivative of the arc-cosine kernel `(pi - theta) / (2 pi)`). The
    second is 0 on the diagonal (`E[phi'(u_c)^2] = 1/2`) and infinite off it where two inputs are
    parallel (theta = 0 or pi), where it is set to 0."""
    c = jnp.diagonal(S)
    norm = jnp.sqrt(c[:, None] * c[None, :])
    cos = jnp.clip(S / norm, -1.0, 1.0)
    sin = jnp.sqrt(1.0 - cos**2)
    dPhi = _price(norm * sin / (2 * jnp.pi * c[:, None]), (jnp.pi - jnp.arccos(cos)) / (2 * jnp.pi), dS)
    d = jnp.diagonal(dS) / c
    dcos = dS / norm - 0.5 * cos * (d[:, None] + d[None, :])
    parallel = sin <= jnp.finfo(S.dtype).eps ** 0.5
    return dPhi, jnp.where(parallel, 0.0, dcos / (2 * jnp.pi * jnp.where(parallel, 1.0, sin)))


def _derivatives(act, order):
    """`[phi, phi', ..., phi^(order)]`, elementwise."""
    out = [act.fn, act.dfn]
    while len(out) <= order:
        out.append(jnp.vectorize(jax.grad(out[-1])))
    return out


class _Kernels(eqx.Module):
    """The lazy kernels of `problem` as the recursion reads them: `Phis` Phi^0..Phi^L (`Phi^0 = Kx`),
    `Gs` G^1..G^{L+1} (`G^{L+1} = 1`), `Gdot` Gdot^1..Gdot^L, and the NTK `K`, all `(Pa, Pa)`."""

    Phis: list
    Gs: list
    Gdot: list
    K: jax.Array

    def __init__(self, problem):
        Phi, G, self.K = lazy_kernels(problem)
        self.Phis, self.Gs = [problem.data.Kx, *Phi], [*G, jnp.ones_like(self.K)]
        pre = problem.net.preactivation_kernel
        self.Gdot = [problem.activation.kernels(pre(self.Phis[l]))[1] for l in range(problem.depth)]


def _layers(problem, kernels, key, n_samples):
    """Each layer's `n_samples` neurons at t = 0: dicts with `u (S, Pa)` (its preactivations, i.i.d.
    `N(0, Phi~^{l-1})`), `phi`, `dphi` and `g = phi' z` (`z ~ N(0, sigma_w^2 G^{l+1})`, independent of u
    to first order), `means` (the sample kernels `<phi phi^T>`, `<phi' phi'^T>`, `<g g^T>`) and `price`,
    the first-order change of `(Phi^l, Gdot^l)` for a change of the covariance of u."""
    net, act, dtype = problem.net, problem.activation, problem.data.Kx.dtype
    pre, Pa = net.preactivation_kernel, problem.data.Kx.shape[0]
    d = _derivatives(act, 3 if act.smooth else 1)
    mean = lambda a, b: a.T @ b / n_samples
    layers = []
    for l, k in enumerate(jr.split(key, problem.depth)):
        k_u, k_z = jr.split(k)
        u = normal(k_u, (n_samples, Pa), dtype) @ factor(pre(kernels.Phis[l]))[0].T
        z = normal(k_z, (n_samples, Pa), dtype) @ factor(net.sw2 * kernels.Gs[l + 1])[0].T
        phi, dphi = d[0](u), d[1](u)
        if act.smooth:  # Price's theorem with the sampled moments of phi's derivatives
            ddphi = d[2](u)
            D = (mean(ddphi, phi), mean(dphi, dphi)), (mean(d[3](u), dphi), mean(ddphi, ddphi))
            price = lambda dS, D=D: (_price(*D[0], dS), _price(*D[1], dS))
        else:
            price = functools.partial(_relu_price, pre(kernels.Phis[l]))
        g = dphi * z
        means = (mean(phi, phi), mean(dphi, dphi), mean(g, g))
        layers.append(dict(u=u, phi=phi, dphi=dphi, g=g, means=means, price=price))
    return layers


def _propagate(problem, kernels, layers, l0, noise):
    """The first-order changes of every kernel for sampling noise `noise = (xi_Phi, xi_Gdot, xi_G)`
    (each `(Pa, Pa)`) in layer `l0` (0-based) alone: `(dPhi, dGdot, dG, dK)` with `dPhi` over
    Phi^0..Phi^L, `dGdot` over Gdot^1..Gdot^L (noise included), `dG` over G^1..G^{L+1}. Both kernel maps
    of a layer move with the layer below; `xi_G` is the whole noise of `G^l = sigma_w^2 G^{l+1} * Gdot^l`."""
    L, sw2, pre = problem.depth, problem.net.sw2, problem.net.preactivation_kernel
    zero = jnp.zeros_like(kernels.K)
    dPhi, dGdot, dprice = [zero], [], []
    for l in range(L):
        d_phi, d_gdot = layers[l]["price"](sw2 * dPhi[l])
        own = l == l0
        dPhi.append(d_phi + noise[0] if own else d_phi)
        dprice.append(d_gdot)
        dGdot.append(d_gdot + noise[1] if own else d_gdot)
    dG = [zero]  # G^{L+1} = 1 is exact
    for l in reversed(range(L)):
        dG_l = sw2 * (dG[0] * kernels.Gdot[l] + kernels.Gs[l + 1] * dprice[l])
        dG.insert(0, dG_l + noise[2] if l == l0 else dG_l)
    dK = sum(dG[l] * pre(kernels.Phis[l]) + kernels.Gs[l] * sw2 * dPhi[l] for l in range(L + 1))
    return dPhi, dGdot, dG, dK


def _noise(layer, chunk):
    """The sampling noise `(xi_Phi, xi_Gdot, xi_G)`, each `(c, Pa, Pa)`, of a chunk `(phi, dphi, g)` of a
    layer's neurons, centred at the layer's sample kernels."""
    outer = jax.vmap(lambda a: jnp.outer(a, a))
    return tuple(outer(x) - m for x, m in zip(chunk, layer["means"]))


def _chunked(layer, chunk_size, fn):
    """`fn(noise)` (`_noise`) summed over the layer's neurons, `chunk_size` at a time, into a running sum
    (the sums can be Pa^4 each: one copy, not one per chunk)."""
    S = layer["phi"].shape[0]
    chunks = tuple(layer[k].reshape(S // chunk_size, chunk_size, -1) for k in ("phi", "dphi", "g"))
    one = lambda c: fn(_noise(layer, c))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(one, tuple(x[0] for x in chunks)))
    return jax.lax.scan(lambda acc, c: (jax.tree.map(jnp.add, acc, one(c)), None), zeros, chunks)[0]


@_xla.jit
def lazy_coefficients(problem, f, key, n_samples, chunk_size):
    """`fluctuations`' variance coefficients in the lazy limit at any depth, with standard errors (flat
    dicts keyed by "f", "ntk", "loss", "loss_test"), and the predictions `F (T, P, 1)` of the static NTK."""
    data, P, loss = problem.data, problem.P, problem.loss
    T, Pa = problem.n_steps + 1, data.Kx.shape[0]
    kernels = _Kernels(problem)
    layers = _layers(problem, kernels, key, n_samples)
    F, f_lin = jax.linearize(lambda K_: euler_predictions(problem, jnp.broadcast_to(K_, (T, Pa, Pa))), kernels.K)
    grads = {"loss": (data.Y, F[:, :P]), "loss_test": (data.Y_test, F[:, P:])}
    grads = {k: jax.vmap(jax.grad(lambda f, Y=Y: loss.value(f, Y)))(f) for k, (Y, f) in grads.items() if Y is not None}

    def influences(l, noise):
        """Moments over a chunk of layer l's neurons of their influences."""
        i_K = jax.vmap(lambda n: _propagate(problem, kernels, layers, l, n)[3])(noise)
        i_f = jax.vmap(f_lin)(i_K)
        out = {"f": i_f, "ntk": i_K[:, None, :P, :P]}
        out |= {
            k: jnp.einsum("tpc,stpc->st", d, i_f[:, :, slice(None, P) if k == "loss" else slice(P, None)])
            for k, d in grads.items()
        }
        return moments(out)

    m = [
        jax.tree.map(lambda x: x / n_samples, _chunked(layer, chunk_size, functools.partial(influences, l)))
        for l, layer in enumerate(layers)
    ]
    # independent layers: the variances add, and so do the variances of their estimates; the NTK is static
    static = lambda name, x: jnp.broadcast_to(x, (T, *x.shape[1:])) if name == "ntk" else x
    coef = {name: static(name, sum(x[name][0] for x in m)) * n_samples / (n_samples - 1) for name in m[0]}
    spread = lambda name: sum(jnp.maximum(x[name][1] - x[name][0] ** 2, 0.0) for x in m)
    se = {name: static(name, jnp.sqrt(spread(name) / n_samples)) for name in m[0]}
    return coef, se, F[:, :P]


def _projection(problem, kernels, layers, l):
    """`N E[G^l_N] - sigma_w^2 N E[G^{l+1}_N * Gdot^l_N]` (Pa, Pa) for layer `l` (0-based) below the last:
    the backward pass reuses the weights W that made the next layer's preactivations h from this
    layer's phi. Given h, W is their least-squares part plus Gaussian noise orthogonal to phi, so neuron
    j's `z_j = X^T v_j + noise` with `v_j = sigma_w^2 Phi~^{-1} phi_j`, `X = <h g^T>_N = O(N^-1/2)` (the
    next layer's), and the noise misses `sigma_w^2 phi_j^T Phi~^{-1} phi_j / N` of its variance. Both are
    O(1/N) in G^l (docs/theory_extensions.md section 13)."""
    sw2, Gs = problem.net.sw2, kernels.Gs
    layer, up = layers[l], layers[l + 1]
    S = layer["phi"].shape[0]
    v = sw2 * layer["phi"] @ jnp.linalg.inv(problem.net.preactivation_kernel(kernels.Phis[l + 1]))
    missed = jnp.sum(v * layer["phi"], 1)
    t2 = -sw2 * Gs[l + 1] * ((layer["dphi"] * missed[:, None]).T @ layer["dphi"]) / S
    pairs = lambda a, b: (a[:, :, None] * b[:, None, :]).reshape(S, -1)
    W = pairs(layer["dphi"], layer["dphi"]).T @ pairs(v, v) / S  # E[phi'_m phi'_n v_a v_c], rows (m, n)
    M = pairs(up["u"], up["u"]).T @ pairs(up["dphi"], up["dphi"]) / S  # E[h_a h_c phi'(h_m) phi'(h_n)]
    t3 = sw2 * Gs[l + 2] * jnp.sum(W * M.T, 1).reshape(t2.shape)  # N E[X_am X_cn] = sw2 G^{l+2}_mn M
    return t2 + t3


def _influence_moments(problem, kernels, layers, f_lin, curvature, chunk_size):
    """The sums over every layer's neurons, divided by the neurons per layer, of the products of their
    influences that the second order needs: `G_Gdot (L, Pa, Pa)` (`dG^{l+1} * dGdot^l`), `G_Phi (L + 1,
    Pa, Pa)` (`dG^{l+1} * dPhi^l`), `Phi_Phi (L - 1, Pa^2, Pa^2)` (`dPhi^l (x) dPhi^l`, l = 1..L-1), `f (T,
    Pa)` (f's second derivative along the influence on K) and `f_f (T, Pa, Pa)` (f's equal-time products)."""
    L = problem.depth

    def sums(l, noise):
        dPhi, dGdot, dG, dK = jax.vmap(lambda n: _propagate(problem, kernels, layers, l, n))(noise)
        i_f = jax.vmap(f_lin)(dK)
        flat = lambda x: x.reshape(x.shape[0], -1)
        return {
            "G_Gdot": jnp.stack([jnp.sum(dG[k + 1] * dGdot[k], 0) for k in range(L)]),
            "G_Phi": jnp.stack([jnp.sum(dG[k] * dPhi[k], 0) for k in range(L + 1)]),
            "Phi_Phi": jnp.stack([flat(dPhi[k]).T @ flat(dPhi[k]) for k in range(1, L)] or [jnp.zeros((0, 0))]),
            "f": jnp.sum(jax.vmap(curvature)(dK), 0),
            "f_f": jnp.einsum("jta,jtb->tab", i_f, i_f),
        }

    per_layer = [_chunked(layer, chunk_size, functools.partial(sums, l)) for l, layer in enumerate(layers)]
    n_samples = layers[0]["phi"].shape[0]
    return jax.tree.map(lambda *x: sum(x) / n_samples, *per_layer)  # each layer's N neurons add their terms


def _ntk_shift(problem, kernels, layers, E):
    """`N E[K_N - K] (Pa, Pa)` from the influences' moments `E` (`_influence_moments`): the recursion to
    second order, Price's theorem twice on the covariance of the influences on the layer below, the
    influences' covariance inside each product of kernels, and `_projection`."""
    L, sw2, pre = problem.depth, problem.net.sw2, problem.net.preactivation_kernel
    Pa, S = kernels.K.shape[0], layers[0]["phi"].shape[0]
    act = problem.activation
    if act.smooth:  # Price's theorem twice, with the sampled moments of phi's derivatives
        d = _derivatives(act, 5)
        fourth = lambda u, k0: [d[k0 + k](u).T @ d[k0 + 4 - k](u) / S for k in range(5)]
        curvature = lambda l, C: tuple(_price2(fourth(layers[l]["u"], k0), C) for k0 in (0, 1))
    else:  # relu: the closed-form kernels' own second derivatives
        curvature = lambda l, C: _relu_curvature(pre(kernels.Phis[l]), C)
    zero = jnp.zeros_like(kernels.K)
    aPhi, aGdot = [zero], []  # N E[Phi^l_N - Phi^l], N E[Gdot^l_N - Gdot^l]
    for l, layer in enumerate(layers):
        a, b = layer["price"](sw2 * aPhi[l])
        if l > 0:  # Phi^0 = Kx is exact
            a2, b2 = curvature(l, sw2**2 * E["Phi_Phi"][l - 1].reshape((Pa,) * 4))
            a, b = a + 0.5 * a2, b + 0.5 * b2
        aPhi.append(a)
        aGdot.append(b)
    aG = [zero]  # G^{L+1} = 1 is exact
    for l in reversed(range(L)):
        projection = _projection(problem, kernels, layers, l) if l < L - 1 else zero
        aG.insert(0, sw2 * (aG[0] * kernels.Gdot[l] + kernels.Gs[l + 1] * aGdot[l] + E["G_Gdot"][l]) + projection)
    return sum(aG[l] * pre(kernels.Phis[l]) + sw2 * (kernels.Gs[l] * aPhi[l] + E["G_Phi"][l]) for l in range(L + 1))


def _shift(problem, kernels, key, n_samples, chunk_size):
    """One estimate, from `n_samples` neurons per layer, of `(N E[f_N - f] (T, Pa), N Cov(f(t)) (T, Pa,
    Pa), N E[K_N - K] (Pa, Pa))`, the covariance at equal times: f's first derivative along the NTK's
    shift plus its second along each neuron's influence on K."""
    T, Pa = problem.n_steps + 1, problem.data.Kx.shape[0]
    layers = _layers(problem, kernels, key, n_samples)
    predictions = lambda K_: euler_predictions(problem, jnp.broadcast_to(K_, (T, Pa, Pa)))[..., 0]
    _, f_lin = jax.linearize(predictions, kernels.K)
    curvature = lambda d: jax.jvp(lambda K_: jax.jvp(predictions, (K_,), (d,))[1], (kernels.K,), (d,))[1]
    E = _influence_moments(problem, kernels, layers, f_lin, curvature, chunk_size)
    ntk = _ntk_shift(problem, kernels, layers, E)
    return f_lin(ntk) + 0.5 * E["f"], E["f_f"], ntk


@_xla.jit
def lazy_bias(problem, key, n_samples, chunk_size):
    """`fluctuations`' mean-shift coefficients in the lazy limit for a smooth activation or relu and scalar
    targets, at depth >= 2 (at depth 1 `fluctuations` follows the neurons' paths; this recursion is their
    cross-check): `(coef, se)`, flat dicts keyed by "f_bias" `(T, Pa, 1)`, "loss_bias" and
    "loss_test_bias" `(T,)`, and "ntk_bias" `(T, P, P)` (static). The mean of `BIAS_GROUPS` independent
    estimates (`_shift`), each from `n_samples / BIAS_GROUPS` neurons per layer; the standard error is
    their spread over `sqrt(BIAS_GROUPS)`."""
    kernels = _Kernels(problem)
    T, P, Pa = problem.n_steps + 1, problem.P, problem.data.Kx.shape[0]
    f = euler_predictions(problem, jnp.broadcast_to(kernels.K, (T, Pa, Pa)))[..., 0]
    S = n_samples // BIAS_GROUPS
    chunk = math.gcd(S, chunk_size)

    def one(key):
        shift, cov, ntk = _shift(problem, kernels, key, S, chunk)
        return shift_coefficients(problem, f, shift, cov) | {"ntk_bias": jnp.broadcast_to(ntk[:P, :P], (T, P, P))}

    est = jax.lax.map(one, jr.split(key, BIAS_GROUPS))
    coef = jax.tree.map(lambda x: x.mean(0), est)
    se = jax.tree.map(lambda x: x.std(0, ddof=1) / math.sqrt(BIAS_GROUPS), est)
    return coef, se


def lazy_bytes(problem, n_samples, chunk_size) -> int:
    """The peak memory of `lazy_coefficients` or `lazy_bias`, whichever is larger (they run one after the
    other), fitted to XLA's memory analysis of both on 14 problems (depth 2-4, Pa 12-104, T 11-201, chunks
    of 256 and 512): `lazy_coefficients` holds each chunk's influences on f over time (`c T Pa^2`) and its
    losses' pair moments (`c T^2`), within 0.9-1.2 of XLA; `lazy_bias` adds each layer's `Pa^4` pair
    moments of `dPhi` and its projection's, within 0.55-1.45 (XLA's schedule of those varies)."""
    L, T, Pa = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0]
    c, c_bias = chunk_size, math.gcd(n_samples // BIAS_GROUPS, chunk_size)
    coefficients = c * T * Pa**2 + 1.2 * c * T**2 + 2.5 * L * n_samples * Pa + 0.2 * T * Pa**2
    bias = 1.3 * c_bias * T * Pa**2 + 6.7 * (L - 1) * Pa**4 + 0.15 * c_bias * T**2
    return int(max(coefficients, bias) * problem.data.Kx.dtype.itemsize)
