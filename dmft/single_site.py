"""The single-site process of the discrete DMFT (THEORY sections 3, 4 and 7), shared by `MonteCarlo`,
`field_samples` and `Perturbative`.

Every neuron of layer l is an independent draw of

    h = u + gamma0 C g,      z = r + gamma0 D phi(h),      g = phi'(h) z

over the grid of (time, point) pairs, with the memory kernels (`memory`)

    C^l = sw2 Abar^{l-1} + c [s < t] Phi~^{l-1} Delta,      D^l = sw2 Bbar^l + c [s < t] sw2 G^{l+1} Delta,

`c = dt eta0 / P`, `Delta` on the column (source) index, `sw2 = sigma_w^2` and `Phi~ = sigma_w^2 Phi +
sigma_b^2` (THEORY 11; the sources are `u ~ N(0, Phi~^{l-1})`, `r ~ N(0, sw2 G^{l+1})`). C is strictly
causal and D causal (its equal-time block is the equal-time response Bbar(t, t), see `MonteCarlo`), so
ONE pass forward in time solves the fields of a sample exactly: at time t, h(t) first, then z(t), then g(t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["memory", "layer_memory", "segments", "fields", "two_layer_fields"]


def memory(R, K_Delta, c):
    """`R + c [s < t] K_Delta`: the memory kernel C (R = Abar^{l-1}, K_Delta = Phi^{l-1} Delta) or D
    (R = Bbar^l, K_Delta = G^{l+1} Delta), Delta already multiplied onto the column index.

    Time axes: 0 and 2 of `(T, M, T, M')` or `(T, M, T)`, 0 and 1 of `(T, T)`; R broadcasts."""
    T = K_Delta.shape[0]
    mask = jnp.tril(jnp.ones((T, T), K_Delta.dtype), -1)
    if K_Delta.ndim > 2:
        mask = mask[:, None, :] if K_Delta.ndim == 3 else mask[:, None, :, None]
    return R + c * mask * K_Delta


def layer_memory(net, Phi_prev, A_prev, G_next, B, Delta, c):
    """The source covariances `Su = Phi~^{l-1}`, `Sr = sw2 G^{l+1}` and memory kernels `C^l`, `D^l` of a
    layer from its neighbours' kernels `Phi^{l-1}` (Kx for layer 1), `Abar^{l-1}`, `G^{l+1}` (1 for
    layer L), `Bbar^l` (0 where absent), all `(T, Pa, T, Pa)` or broadcastable, and `Delta (T, Pa)`."""
    Su, Sr = net.preactivation_kernel(Phi_prev), net.sw2 * G_next
    cols = Delta[None, None]
    return Su, Sr, memory(net.sw2 * A_prev, Su * cols, c), memory(net.sw2 * B, Sr * cols, c)


def segments(T, n=4):
    """Time boundaries `[(t0, t1), ...]` of n near-equal segments of the grid (fewer when T < n)."""
    edges = sorted(set(np.linspace(0, T, min(n, T) + 1).round().astype(int).tolist()))
    return list(zip(edges[:-1], edges[1:]))


def fields(act, gamma0, u, r, C, D, full=False):
    """The causal single-site pass for samples `u, r (S, T, Pa)` and memory kernels `C, D (T, Pa, T, Pa)`.

    Returns `(phi(h), g)`, both `(S, T Pa)` (time-major), and with `full=True` also `h, z (S, T, Pa)`.
    The scan runs in `segments`: within the segment ending at t1 the history and the memory kernels
    are cut to the first t1 times (causality), which saves about 3/8 of the products.
    """
    S, T, Pa = u.shape
    # gamma0 folded into the (T Pa)^2 memory kernels once, not into the (S, t Pa) history every step.
    Cm, Dm = (gamma0 * C).reshape(T, Pa, T * Pa), (gamma0 * D).reshape(T, Pa, T * Pa)

    def step(carry, xs):
        phis, gs = carry
        t, C_t, D_t = xs
        h = u[:, t] + gs @ C_t.T
        phis = jax.lax.dynamic_update_slice(phis, act.fn(h), (0, t * Pa))
        z = r[:, t] + phis @ D_t.T
        gs = jax.lax.dynamic_update_slice(gs, act.dfn(h) * z, (0, t * Pa))
        return (phis, gs), (h, z) if full else None

    phis = gs = jnp.zeros((S, 0), u.dtype)
    hz = []
    for t0, t1 in segments(T):
        w = t1 * Pa
        phis, gs = (jnp.pad(x, ((0, 0), (0, w - x.shape[1]))) for x in (phis, gs))
        xs = (jnp.arange(t0, t1), Cm[t0:t1, :, :w], Dm[t0:t1, :, :w])
        (phis, gs), out = jax.lax.scan(step, (phis, gs), xs)
        hz.append(out)
    if not full:
        return phis, gs
    h, z = (jnp.moveaxis(jnp.concatenate(x), 0, 1) for x in zip(*hz))
    return phis, gs, h, z


def two_layer_fields(act, gamma0, c, Su, sw2, u, r, Delta, reduce):
    """The depth-1 single site (THEORY 7, 11): `u (S, Pa)` constant in time with covariance
    `Su = sigma_w^2 Kx + sigma_b^2`, `r (S,)` the read-out weight times sigma_w (variance `sw2`),
    `h(t) = u + gamma0 c sum_{s<t} Su (Delta(s) g(s))`, `z(t) = r + gamma0 c sw2 sum_{s<t} Delta(s) . phi(h(s))`.

    Returns `reduce(phi(h(t)), g(t))` stacked over the T times of `Delta (T, Pa)` (memory O(S Pa)).
    """

    def step(carry, Delta_t):
        h_mem, z = carry
        h = u + h_mem
        phi, g = act.fn(h), act.dfn(h) * z[:, None]
        h_mem = h_mem + gamma0 * c * (Delta_t * g) @ Su
        z = z + gamma0 * c * sw2 * phi @ Delta_t
        return (h_mem, z), reduce(phi, g)

    return jax.lax.scan(step, (jnp.zeros_like(u), r), Delta)[1]
