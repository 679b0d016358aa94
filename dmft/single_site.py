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

With C outputs (THEORY 12) the backward fields r, z, g carry a class index: their grid is the
(time, point, class) triples, flattened `T Pa C` point-major, and G, Abar, Bbar, C, D are indexed
accordingly (`Abar^l (T Pa, T Pa C)`, `Bbar^l (T Pa C, T Pa)`); h, u and Phi do not.
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
    layer from its neighbours' kernels `Phi^{l-1}` (Kx for layer 1) `(T, Pa, T, Pa)`, `Abar^{l-1}`
    `(T, Pa, T, Pa C)`, `G^{l+1}` `(T, Pa C, T, Pa C)` (None for layer L: `G^{L+1} = delta_{c c'}`, the
    read-outs of different classes are independent, and `Sr = sw2`), `Bbar^l` `(T, Pa C, T, Pa)` (0
    where absent), and `Delta (T, Pa, C)`: `C^l (T, Pa, T, Pa C)`, `D^l (T, Pa C, T, Pa)`."""
    T, Pa, C = Delta.shape
    Su = net.preactivation_kernel(Phi_prev)
    Sr = net.sw2 if G_next is None else net.sw2 * G_next
    # One output: the scalar products themselves (a class sum of one term rounds the same, but XLA may
    # fuse it differently, and the Stein regressions amplify round-off).
    if C == 1:
        Su_Delta = Su * Delta[None, None, :, :, 0]
        Sr_Delta = jnp.broadcast_to(Sr * Delta[None, None, :, :, 0], (T, Pa, T, Pa))
    else:
        Su_Delta = (Su[..., None] * Delta[None, None]).reshape(T, Pa, T, Pa * C)
        if G_next is None:  # sum_c' delta_{c c'} Delta_{nu c'}(s), the same for every (t, mu)
            Sr_Delta = Sr * jnp.broadcast_to(jnp.moveaxis(Delta, -1, 0)[None, None], (T, Pa, C, T, Pa))
            Sr_Delta = Sr_Delta.reshape(T, Pa * C, T, Pa)
        else:
            Sr_Delta = (Sr.reshape(T, Pa * C, T, Pa, C) * Delta[None, None]).sum(-1)
    return Su, Sr, memory(net.sw2 * A_prev, Su_Delta, c), memory(net.sw2 * B, Sr_Delta, c)


_BLOCKS = 6  # time blocks of the causal pass (`fields`)


def segments(T, n=4):
    """Time boundaries `[(t0, t1), ...]` of n near-equal segments of the grid (fewer when T < n)."""
    edges = sorted(set(np.linspace(0, T, min(n, T) + 1).round().astype(int).tolist()))
    return list(zip(edges[:-1], edges[1:]))


def fields(act, gamma0, u, r, C, D, full=False):
    """The causal single-site pass for samples `u (S, T, Pa)`, `r (S, T, Pa C)` and memory kernels
    `C (T, Pa, T, Pa C)`, `D (T, Pa C, T, Pa)`.

    Returns `phi(h) (S, T Pa)` and `g (S, T Pa C)` (time-major), and with `full=True` also `h (S, T, Pa)`,
    `z (S, T, Pa C)`.
    The time steps run in `_BLOCKS` equal blocks (the grid padded at its end), a scan over blocks: the
    memory of the earlier blocks enters a block's fields in two matrix products with the fields so far
    (zero ahead), and only the memory within the block is a product per time step (skinny products, which
    run far below a full product's speed, over a short history). One block's code compiles once.
    """
    S, T, Pa = u.shape
    PC = r.shape[2]
    n_blocks = min(_BLOCKS, T)
    b = -(-T // n_blocks)  # steps per block
    pad = n_blocks * b - T  # padded times come last: causality keeps them out of the real ones
    Tp = T + pad
    # gamma0 folded into the (T Pa)^2 memory kernels once, not into the (S, t Pa) history every step.
    Cm = jnp.pad(gamma0 * C, ((0, pad), (0, 0), (0, pad), (0, 0))).reshape(n_blocks, b * Pa, Tp * PC)
    Dm = jnp.pad(gamma0 * D, ((0, pad), (0, 0), (0, pad), (0, 0))).reshape(n_blocks, b * PC, Tp * Pa)
    by_block = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(S, n_blocks, b, -1), 1, 0)

    def step(carry, xs):
        phis, gs = carry  # the block's fields so far, zero ahead
        k, h_past, z_past, C_t, D_t = xs
        h = h_past + gs @ C_t.T
        phis = jax.lax.dynamic_update_slice(phis, act.fn(h), (0, k * Pa))
        z = z_past + phis @ D_t.T
        g = act.dfn(h) * z if PC == Pa else (act.dfn(h)[:, :, None] * z.reshape(S, Pa, PC // Pa)).reshape(S, PC)
        gs = jax.lax.dynamic_update_slice(gs, g, (0, k * PC))
        return (phis, gs), (h, z) if full else None

    def block(carry, xs):
        phis, gs = carry  # the fields of all times so far, zero from this block on
        k, u_k, r_k, C_k, D_k = xs
        # The sources plus the memory of the earlier blocks (the later columns multiply zeros).
        h_past = u_k + (gs @ C_k.T).reshape(S, b, Pa)
        z_past = r_k + (phis @ D_k.T).reshape(S, b, PC)
        within = lambda X, m: jax.lax.dynamic_slice_in_dim(X.reshape(b, -1, X.shape[-1]), k * b * m, b * m, axis=2)
        xs = (jnp.arange(b), jnp.moveaxis(h_past, 1, 0), jnp.moveaxis(z_past, 1, 0), within(C_k, PC), within(D_k, Pa))
        zeros = (jnp.zeros((S, b * Pa), u.dtype), jnp.zeros((S, b * PC), u.dtype))
        (block_phis, block_gs), out = jax.lax.scan(step, zeros, xs)
        phis = jax.lax.dynamic_update_slice(phis, block_phis, (0, k * b * Pa))
        gs = jax.lax.dynamic_update_slice(gs, block_gs, (0, k * b * PC))
        return (phis, gs), out

    init = (jnp.zeros((S, Tp * Pa), u.dtype), jnp.zeros((S, Tp * PC), u.dtype))
    xs = (jnp.arange(n_blocks), by_block(u), by_block(r), Cm, Dm)
    (phis, gs), hz = jax.lax.scan(block, init, xs)
    phis, gs = phis[:, : T * Pa], gs[:, : T * PC]
    if not full:
        return phis, gs
    h, z = (jnp.moveaxis(x.reshape(Tp, S, -1)[:T], 0, 1) for x in hz)
    return phis, gs, h, z


def two_layer_fields(act, gamma0, c, Su, sw2, u, r, Delta, reduce):
    """The depth-1 single site (THEORY 7, 11, 12): `u (S, Pa)` constant in time with covariance
    `Su = sigma_w^2 Kx + sigma_b^2`, `r (S, C)` the read-out weights times sigma_w (variance `sw2`),
    `h(t) = u + gamma0 c sum_{s<t} Su (sum_c Delta_c(s) g_c(s))`,
    `z(t) = r + gamma0 c sw2 sum_{s<t} Delta(s)^T phi(h(s))`, `g_c = phi'(h) z_c`.

    Returns `reduce(phi(h(t)) (S, Pa), g(t) (S, Pa C), z(t) (S, C))` stacked over the T times of `Delta (T, Pa, C)`
    (memory O(S Pa C)).
    """
    S, Pa = u.shape

    def step(carry, Delta_t):
        h_mem, z = carry
        h = u + h_mem
        phi, dphi = act.fn(h), act.dfn(h)
        g = (dphi[:, :, None] * z[:, None, :]).reshape(S, -1)
        out = reduce(phi, g, z)
        h_mem = h_mem + gamma0 * c * (dphi * (z @ Delta_t.T)) @ Su
        z = z + gamma0 * c * sw2 * phi @ Delta_t
        return (h_mem, z), out

    return jax.lax.scan(step, (jnp.zeros_like(u), r), Delta)[1]
