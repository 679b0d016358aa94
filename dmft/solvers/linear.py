"""Deep linear networks: the exact algebraic DMFT closure (THEORY sections 4 and 6).

With phi(h) = h every field is a linear function of the Gaussian sources, so every average is exact.
For scalar output the backward field g^l = z^l is the same for every sample, hence

    G^l   : (T, T)            gradient kernel, time only            (T = n + 1)
    Abar^l: (T, Pa, T)        response of h^l(t, mu) to r^l(s)      (l = 1..L-1)
    Bbar^l: (T, T, Pa)        response of g^{l+1}(t) to u^{l+1}(s, nu)  (l = 1..L-1)
    C^l   = Abar^{l-1} + dt (eta0/P) [s<t] sum_nu Phi^{l-1}_{mu nu}(t,s) Delta_nu(s)      (T Pa x T)
    D^l   = Bbar^l     + dt (eta0/P) [s<t] G^{l+1}(t,s) Delta_nu(s)                       (T x T Pa)

and with `Mt = (I - gamma0^2 D C)^{-1}` (T x T, unit lower triangular because C and D are strictly
causal) the closure of THEORY section 6 becomes, by the Woodbury identity
`M = (I - gamma0^2 C D)^{-1} = I + gamma0^2 C Mt D`,

    Abar^l     = C Mt,     Bbar^{l-1} = Mt D,
    G^l        = Mt (G^{l+1} + gamma0^2 S) Mt^T,                   S = D Phi^{l-1} D^T
    Phi^l      = Phi^{l-1} + Abar Q + Q^T Abar^T,
    Q          = gamma0^2 R + (gamma0^4 S + gamma0^2 G^{l+1}) Abar^T / 2,    R = D Phi^{l-1}.

Two structures make a sweep cheap. (i) The backward field responds to a sample nu only through
that sample's error signal, so `Bbar^l(t, s, nu) = beta^l(t, s) Delta_nu(s)` and `D^l = d^l (x) Delta`
with `d^l = beta^l + dt (eta0/P) [s<t] G^{l+1}` (T x T; induction from Bbar^L = 0). Hence Phi^{l-1} only
enters through its contraction with the error signal, `Psi^{l-1} = Phi^{l-1} Dc^T` (T Pa x T), and
`R = d Psi^T`, `S = d (Dc Psi) d^T`, `D C = d (Dc C)`. (ii) Phi^l is carried as rank-T factors, so
every Psi^l costs two (T Pa x T) (T x T) products. No (T Pa) x (T Pa) matrix is ever formed inside
the iteration and the only solve is a T x T unit-triangular one: a sweep costs O(L T^3 Pa) flops and
the state O(L T^2 Pa) memory. The two-time Phi^l, O(L (T Pa)^2), is materialised once, after the solve.

Weight and bias variances (THEORY 11, `dmft.MLP(sigma_w, sigma_b)`) enter as the sources see them:
`Phi^{l-1} -> Phi~^{l-1} = sw2 Phi^{l-1} + sb2` and `Abar, G^{l+1}, beta -> sw2 times themselves` in the
formulas above, so `Phi^l = Phi~^{l-1} + Abar Q + Q^T Abar^T` and `Psi~^l = sw2 Psi^l + sb2 sum_nu Delta_nu`.

(iii) Everything is strictly causal in time, so the fixed point itself is computed in ONE forward
pass (`_march`: at each t a downward pass over layers for the backward rows, an upward pass for the
forward rows, then the Euler step for Delta(t + 1)), the block forward substitution of the whole
closure. The damped iteration of `dmft.solve` starts from it and its first sweep verifies it.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import costs
from ..activations import Linear
from ..dynamics import (
    error_signal,
    euler_predictions,
    ntk_from_kernels,
    prediction_fields,
    readout_correction,
    split_classes,
)
from ..solve import AbstractIterativeSolver

__all__ = ["LinearClosure"]


class _State(eqx.Module):
    """Order parameters of the closure in factored form. T = n + 1 times, Pa = P + P_test samples, C
    outputs; the backward index runs over (time, class) pairs, `TC = T C`, time-major.

    `Phi^l = Phi^0 + sum_{k<=l} (Abar^k Q^k + (Abar^k Q^k)^T)` with `Phi^0 = 1 1^T (x) Kx`, so the
    state carries the rank-TC factors instead of the (T Pa)^2 kernels:
    A: (L, T, Pa, TC) = Abar^1..Abar^L (Abar^L is only a factor of Phi^L, not a response function);
    Q: (L, TC, T, Pa); G: (L, TC, TC); beta: (L-1, TC, TC) with
    `Bbar^l((t, c), (s, nu)) = sum_c' beta^l((t, c), (s, c')) Delta_{nu c'}(s)`; eps: (T, Pa, C), the
    correction of each Euler step of the predictions (`dynamics.readout_correction`; zero for
    `predictions="euler"`).
    """

    A: jax.Array
    Q: jax.Array
    G: jax.Array
    beta: jax.Array
    eps: jax.Array


def _contract(X, Delta):
    """`Dc`: `sum_nu X[..., s, nu] Delta_{nu c}(s)` over the last two axes `(T, Pa)` -> `(..., T C)`."""
    Y = jnp.einsum("...sn,snc->...sc", X, Delta)
    return Y.reshape(*Y.shape[:-2], -1)


def _row_contract(Delta, X):
    """`Dc X`: `sum_nu Delta_{nu c}(s) X[s, nu, ...]` over the first two axes `(T, Pa)` -> `(T C, ...)`."""
    Y = jnp.einsum("snc,sn...->sc...", Delta, X)
    return Y.reshape(-1, *Y.shape[2:])


def _causal(T, C, dtype):
    """`[s < t]` over (time, class) rows and columns, `(T C, T C)`."""
    return jnp.kron(jnp.tril(jnp.ones((T, T), dtype), -1), jnp.ones((C, C), dtype))


def _readout_G(T, C, dtype):
    """`G^{L+1} = 1 (x) I_C (T C, T C)`: the read-out weights of different outputs are independent."""
    return jnp.kron(jnp.ones((T, T), dtype), jnp.eye(C, dtype=dtype))


def _psi_increment(A, Q, Delta):
    """`(U W + W^T U^T) Dc^T` for one layer's factors `U = A (T, Pa, TC)`, `W = Q (TC, T, Pa)` ->
    (T, Pa, TC): two (T Pa, TC) x (TC, TC) products."""
    QD = _contract(Q, Delta)  # [rho, sigma]
    AD = _row_contract(Delta, A)  # [sigma, rho]
    return jnp.einsum("tmr,rs->tms", A, QD) + jnp.einsum("rtm,sr->tms", Q, AD)


def _psi0(net, Kx, Delta):
    """`Psi~^0 (T, Pa, TC)`: `Psi~^0[t, mu, (s, c)] = sum_nu Phi~^0_{mu nu} Delta_{nu c}(s)` (every t)."""
    T, Pa, C = Delta.shape
    row = jnp.einsum("mn,snc->msc", net.preactivation_kernel(Kx), Delta).reshape(Pa, T * C)
    return jnp.broadcast_to(row, (T, Pa, T * C))


def _psi(net, Kx, A, Q, Delta):
    """`Psi~^l = Phi~^l Dc^T`, l = 0..L-1 -> (L, T, Pa, TC) with `Phi~^l = sw2 (Phi~^{l-1} + U W + W^T U^T)
    + sb2`, from the factors of every layer below (O(L T^3 Pa C^2))."""
    psi = [_psi0(net, Kx, Delta)]
    for l in range(A.shape[0] - 1):
        psi.append(_next_psi(net, psi[-1] + _psi_increment(A[l], Q[l], Delta), Delta))
    return jnp.stack(psi)


def _next_psi(net, psi, Delta):
    """`Psi~^l` from `Psi^l = Phi^l Dc^T (..., TC)`: `sw2 Psi^l + sb2 sum_nu Delta_{nu c}(s)`."""
    return net.sw2 * psi + net.sigma_b**2 * Delta.sum(1).reshape(-1)


def _equal_time_Phi(net, Kx, A, Q):
    """`Phi^l(t, t) = Phi~^{l-1}(t, t) + (U W + W^T U^T)(t, t)` for l = 1..L -> (L, T, Pa, Pa)."""
    E = jnp.einsum("ktms,kstn->ktmn", A, Q)
    Phi, prev = [], net.preactivation_kernel(Kx)
    for l in range(A.shape[0]):
        Phi.append(prev + E[l] + jnp.swapaxes(E[l], -1, -2))
        prev = net.preactivation_kernel(Phi[-1])
    return jnp.stack(Phi)


def _full_Phi(net, Kx, A, Q):
    """Two-time `Phi^l(t, s)` for l = 1..L -> (L, T, Pa, T, Pa) (materialised once, after the solve).

    One rank-2TC product per layer, `[U, W^T] [W; U^T]`, accumulated in a scan whose outputs are
    written straight into the stacked result (a transpose or a stack of (T Pa)^2 matrices each cost
    as much as the product on CPU).
    """
    L, T, Pa, TC = A.shape

    def layer(prev, factors):
        U, W = factors[0].reshape(T * Pa, TC), factors[1].reshape(TC, T * Pa)
        Phi = prev + jnp.concatenate([U, W.T], axis=1) @ jnp.concatenate([W, U.T], axis=0)
        return net.preactivation_kernel(Phi), Phi

    _, Phi = jax.lax.scan(layer, jnp.tile(net.preactivation_kernel(Kx), (T, T)), (A, Q))
    return Phi.reshape(L, T, Pa, T, Pa)


def _equal_time_G(G, T):
    """Equal-time blocks `G^l((t, c), (t, c')) (L, T, C, C)` of `G (L, TC, TC)`."""
    L, TC = G.shape[:2]
    C = TC // T
    return jnp.moveaxis(jnp.diagonal(G.reshape(L, T, C, T, C), axis1=1, axis2=3), -1, 1)


def _ntk(problem, state):
    net, Kx, C = problem.net, problem.data.Kx, problem.C
    T = state.A.shape[1]
    G_eq = _equal_time_G(state.G, T)  # (L, T, C, C): sample axes of size 1
    return ntk_from_kernels(net, Kx, _equal_time_Phi(net, Kx, state.A, state.Q), G_eq, C)


def _readout(problem, A_L, Psi_L, before):
    """The read-out predictions `f (..., Pa, C)` (THEORY 14) from rows of Abar^L `A_L (..., Pa, TC)` and of
    `Psi~^L` (same shape), `before` the mask [s < t] of their columns: `<r_c h^L(t)> / gamma0 = sw2
    sum_s Abar^L(t, (s, c))` (Stein; the read-out source r^L(s, c) = r_c at every s) plus
    `c sum_{s<t} Psi~^L(t, (s, c))`, `c = eta0 dt / P`."""
    T, C = problem.n_steps + 1, problem.C
    c = problem.dt * problem.eta0 / problem.P
    f = problem.net.sw2 * A_L + c * before * Psi_L
    return f.reshape(*f.shape[:-1], T, C).sum(-2)


def _unit_lower_inverse(N, T):
    """`(I - N)^{-1}` for `N (TC, TC)` strictly lower block-triangular in time (T blocks): N is nilpotent
    (N^T = 0), so the inverse is the finite Neumann series `sum_{j<T} N^j = prod_{k<K} (I + N^(2^k))`,
    K = ceil(log2 T).

    2K matrix products instead of a triangular solve: the same result to round-off, and far faster
    under `vmap` on CPU (a batch of five 101 x 101 solves took 53 ms, the products 3 ms).
    """
    I = jnp.eye(N.shape[-1], dtype=N.dtype)
    inverse, power = I + N, N
    for _ in range(max(math.ceil(math.log2(T)) - 1, 0)):
        power = power @ power
        inverse = inverse @ (I + power)
    return inverse


def _layer(g2, c, Delta, A_prev, Psi_prev, G_next, beta):
    """One layer of THEORY 6 from its neighbours as its sources see them (THEORY 11): sw2 Abar^{l-1}
    `A_prev (T, Pa, TC)`, `Psi~^{l-1} (T, Pa, TC)`, sw2 G^{l+1} `(TC, TC)`, sw2 beta^l `(TC, TC)`. Returns
    Abar^l (T, Pa, TC), Q^l (TC, T, Pa), G^l (TC, TC), beta^{l-1} (TC, TC).

    `D^l = d (x) Delta` with `d = beta^l + c [s<t] G^{l+1}`: the backward field responds to a sample only
    through that sample's error signal, so D Phi^{l-1} = d Psi^{l-1 T} and every product is (T Pa) x TC x TC.
    """
    T, Pa, C = Delta.shape
    mask = _causal(T, C, Delta.dtype)
    C_mem = A_prev + c * mask[::C][:, None, :] * Psi_prev
    d = beta + c * mask * G_next
    Mt = _unit_lower_inverse(g2 * d @ _row_contract(Delta, C_mem), T)  # (I - g2 D C)^{-1}
    Abar = (C_mem.reshape(T * Pa, T * C) @ Mt).reshape(T, Pa, T * C)
    Q, S = _Q_factor(g2, d, Psi_prev, G_next, Abar, Delta)
    G = Mt @ (G_next + g2 * S) @ Mt.T
    return Abar, Q, G, Mt @ d


def _Q_factor(g2, d, Psi_prev, G_next, Abar, Delta):
    """`Q^l (TC, T, Pa)` of `Phi^l = Phi^{l-1} + Abar Q + Q^T Abar^T`, and `S = D Phi^{l-1} D^T (TC, TC)`,
    from `d^l (TC, TC)`, `Psi^{l-1}`, `Abar^l (T, Pa, TC)` and `G^{l+1} (TC, TC)` (module docstring)."""
    T, Pa, C = Delta.shape
    R = d @ Psi_prev.reshape(T * Pa, T * C).T  # D Phi^{l-1}, (TC, T Pa)
    S = _contract(R.reshape(T * C, T, Pa), Delta) @ d.T
    Q = g2 * R + 0.5 * (g2**2 * S + g2 * G_next) @ Abar.reshape(T * Pa, T * C).T
    return Q.reshape(T * C, T, Pa), S


def _sweep(problem, state, responses=True, readout=False):
    """One Jacobi sweep: every layer from the previous iterate of its neighbours and the new Delta (and,
    with `readout`, the new correction eps of the predictions)."""
    net, Kx = problem.net, problem.data.Kx
    Delta = error_signal(problem, _ntk(problem, state), state.eps)
    c = problem.dt * problem.eta0 / problem.P
    T = Delta.shape[0]
    # `_layer` takes the neighbours as the sources see them: sw2 Abar, sw2 G, sw2 beta, Psi~ (THEORY 11).
    on = float(responses) * net.sw2  # gradient independence: Abar = Bbar = 0 in the fields
    A_prev = on * jnp.concatenate([jnp.zeros_like(state.A[:1]), state.A[:-1]])
    G_next = net.sw2 * jnp.concatenate([state.G[1:], _readout_G(T, problem.C, Kx.dtype)[None]])
    beta = on * jnp.concatenate([state.beta, jnp.zeros_like(state.G[:1])])
    layer = lambda *args: _layer(problem.gamma0**2, c, Delta, *args)
    A, Q, G, beta = jax.vmap(layer)(A_prev, _psi(net, Kx, state.A, state.Q, Delta), G_next, beta)
    new = _State(A=A, Q=Q, G=G, beta=beta[1:], eps=state.eps)
    if not readout:
        return new
    Psi_L = _next_psi(net, _psi(net, Kx, A, Q, Delta)[-1] + _psi_increment(A[-1], Q[-1], Delta), Delta)
    before = _causal(T, problem.C, Delta.dtype)[:: problem.C][:, None, :]
    eps = readout_correction(problem, _readout(problem, A[-1], Psi_L, before), _ntk(problem, new), Delta)
    return eqx.tree_at(lambda s: s.eps, new, eps)


def _march(problem, responses=True, readout=False):
    """The closure's exact solution in ONE causal pass over time (the block forward substitution).

    Write `g^l = Mt (r + gamma0 d Dc u)`, so that, with `b = Mt d` (`Bbar^{l-1} = b (x) Delta`),
    `G^l = Mt (G^{l+1} + gamma0^2 d Sigma^{l-1} d^T) Mt^T`, `Sigma = Dc Phi Dc^T` (TC x TC), and
    `Phi^l = Phi^{l-1} + gamma0^2 [Psi^{l-1} (C b)^T + (C b) Psi^{l-1 T} + C G^l C^T]`. Every factor is
    strictly causal, so the rows of time t (C of them: one per class) of each order parameter need
    only rows of times < t and those of time t of the layers before it: at each t a downward pass
    gives d, Mt, b, G^l rows, an upward pass gives C, Abar and Psi^l rows (s <= t) and Phi^l(t, t);
    then the Euler step gives Delta(t + 1). Cost O(L T^3 Pa C^2) for the whole solve, no iteration.
    With `readout`, f(t) is instead the read-out (`_readout`) of the rows of time t, which depend on
    Delta(s < t) only: the forward rows are computed once with the Euler f(t) to read it out, and
    again with the Delta(t) of the read-out f(t). Returns the fixed point as the iteration's `_State`.
    """
    net, Kx, Y, P, L, C = problem.net, problem.data.Kx, problem.data.Y, problem.P, problem.depth, problem.C
    T, Pa = problem.n_steps + 1, Kx.shape[0]
    TC = T * C
    g2, c, sw2 = problem.gamma0**2, problem.dt * problem.eta0 / problem.P, net.sw2
    Kt = net.preactivation_kernel(Kx)
    on = float(responses) * sw2
    z = lambda *shape: jnp.zeros(shape, Kx.dtype)
    small = ("DC", "DCb", "d", "Mt", "b", "G", "Sigma")  # (L, TC, TC) each; rows of times < t are final
    carry = dict(f=z(Pa, C), Delta=z(T, Pa, C), **{name: z(L, TC, TC) for name in small})
    G_readout = _readout_G(T, C, Kx.dtype)
    eye = jnp.eye(TC, dtype=Kx.dtype)

    def rows(X, t):
        """The C rows of time t of `X (TC, TC)`."""
        return jax.lax.dynamic_slice_in_dim(X, t * C, C)

    def set_rows(X, t, row):
        return jax.lax.dynamic_update_slice_in_dim(X, row, t * C, 0)

    def set_sym(X, t, row):
        return jax.lax.dynamic_update_slice_in_dim(set_rows(X, t, row), row.T, t * C, 1)

    def backward_rows(k, t, before):
        """Rows t of d^l, Mt^l, b^l and G^l, from the last layer down (d^l needs b^{l+1}, G^{l+1})."""
        for l in reversed(range(L)):
            G_next = sw2 * (k["G"][l + 1] if l + 1 < L else G_readout)
            b_next = on * rows(k["b"][l + 1], t) if l + 1 < L else 0.0
            d_row = b_next + c * before * rows(G_next, t)
            d = set_rows(k["d"][l], t, d_row)
            Mt_row = rows(eye, t) + g2 * (d_row @ k["DC"][l]) @ k["Mt"][l]
            Mt = set_rows(k["Mt"][l], t, Mt_row)
            b_row = Mt_row @ d
            vX = Mt_row @ G_next + g2 * (b_row @ k["Sigma"][l]) @ d.T
            k["G"] = k["G"].at[l].set(set_sym(k["G"][l], t, vX @ Mt.T))
            k["d"], k["Mt"] = k["d"].at[l].set(d), k["Mt"].at[l].set(Mt)
            k["b"] = k["b"].at[l].set(set_rows(k["b"][l], t, b_row))
        return k

    def forward_rows(k, t, before, Dt):
        """Rows t of C^l, Abar^l, Psi^l (s <= t) and Phi^l(t, t), from the first layer up, and row t of
        Psi~^L for the read-out."""
        upto = jnp.repeat(jnp.arange(T) <= t, C)
        psi = _psi0(net, Kx, k["Delta"])[0]  # row t of Psi~^0, (Pa, TC)
        Phi_eq, Abar, prev = [], [], Kt
        for l in range(L):
            C_row = (on * Abar[-1] if l else 0.0) + c * before * psi
            DC_row = Dt.T @ C_row
            Cb = C_row @ k["b"][l]
            k["DC"] = k["DC"].at[l].set(set_rows(k["DC"][l], t, DC_row))
            k["DCb"] = k["DCb"].at[l].set(set_rows(k["DCb"][l], t, DC_row @ k["b"][l]))
            Abar.append(C_row @ k["Mt"][l])
            CG = C_row @ k["G"][l]
            Phi_eq.append(prev + g2 * (psi @ Cb.T + Cb @ psi.T + CG @ C_row.T))
            prev = net.preactivation_kernel(Phi_eq[-1])
            psi = psi + g2 * (psi @ k["DCb"][l].T + Cb @ k["Sigma"][l] + CG @ k["DC"][l].T)
            psi = upto * _next_psi(net, psi, k["Delta"])
            if l + 1 < L:
                k["Sigma"] = k["Sigma"].at[l + 1].set(set_sym(k["Sigma"][l + 1], t, Dt.T @ psi))
        return k, jnp.stack(Phi_eq), jnp.stack(Abar), psi

    def forward_at(k, t, before, f_t):
        """The forward rows of time t, given the predictions f(t) (hence Delta(t))."""
        k = dict(k, f=f_t)
        Dt = jnp.zeros((Pa, C), Kx.dtype).at[:P].set(problem.loss.delta(f_t[:P], Y))
        k["Delta"] = k["Delta"].at[t].set(Dt)
        sigma0 = jnp.einsum("mc,mn,snd->csd", Dt, Kt, k["Delta"]).reshape(C, TC)
        k["Sigma"] = k["Sigma"].at[0].set(set_sym(k["Sigma"][0], t, sigma0))
        return *forward_rows(k, t, before, Dt), Dt

    def step(k, t):
        before = jnp.repeat(jnp.arange(T) < t, C)
        k = backward_rows(dict(k), t, before)  # needs no Delta(t)
        if readout:  # nor do Abar^L(t) and Psi~^L(t, s < t): read f(t) out of them first
            _, _, Abar, psi_L, _ = forward_at(k, t, before, k["f"])
            k["f"] = _readout(problem, Abar[-1], psi_L, before)
        k, Phi_eq, Abar, _, Dt = forward_at(k, t, before, k["f"])
        G_eq = jax.vmap(lambda G: jax.lax.dynamic_slice(G, (t * C, t * C), (C, C)))(k["G"])  # (L, C, C)
        K = ntk_from_kernels(net, Kx, Phi_eq[:, None], G_eq[:, None], C)[0]
        f_t, euler = k["f"], c * (K[:, : P * C] @ Dt[:P].reshape(-1)).reshape(Pa, C)
        k["f"] = f_t + euler  # Euler: f(t + 1)
        return k, (Abar, f_t, euler)

    k, (Abar, f, euler) = jax.lax.scan(step, carry, jnp.arange(T))
    state = _factorise(problem, jnp.moveaxis(Abar, 0, 1), k["G"], k["d"], k["b"], k["Delta"])
    if not readout:
        return state
    # What the read-out adds to each Euler step (`readout_correction`, from the steps themselves).
    eps = jnp.concatenate([f[1:] - f[:-1] - euler[:-1], jnp.zeros_like(f[:1])])
    return eqx.tree_at(lambda s: s.eps, state, eps)


def _factorise(problem, Abar, G, d, b, Delta):
    """The iteration's factored `_State` from the marched Abar, G, d, b: `Q^l` needs the full Psi^{l-1}."""
    net, Kx, L = problem.net, problem.data.Kx, problem.depth
    T = Delta.shape[0]
    g2 = problem.gamma0**2
    psi = _psi0(net, Kx, Delta)
    Q = []
    for l in range(L):
        G_next = net.sw2 * (G[l + 1] if l + 1 < L else _readout_G(T, problem.C, Kx.dtype))
        Q.append(_Q_factor(g2, d[l], psi, G_next, Abar[l], Delta)[0])
        if l + 1 < L:
            psi = _next_psi(net, psi + _psi_increment(Abar[l], Q[l], Delta), Delta)
    return _State(A=Abar, Q=jnp.stack(Q), G=G, beta=b[1:], eps=jnp.zeros_like(Delta))


class LinearClosure(AbstractIterativeSolver):
    """Exact DMFT of deep linear networks (activation `"linear"`), any depth, train and test points.

    Solves the discrete-time closure of THEORY sections 4 and 6 (left-point rule; `gamma0 -> 0` is
    exactly `Lazy(discrete=True)`) with the predictions of `predictions`, as in `MonteCarlo`:
    `"readout"` (default; THEORY 14, the infinite-width limit of gradient descent on the grid) or
    `"euler"` (THEORY 4). The closure is causal, so its solution is
    computed exactly in one forward pass over time (`start="march"`, the default); the damped
    fixed-point iteration of `dmft.solve` (one Jacobi sweep over the layers per iteration) then starts
    from it, so its first residual is the marched solution's own fixed-point residual (~1e-15 in
    float64) and one iteration verifies convergence. `start="lazy"` iterates from the lazy kernels
    instead (tens of iterations; for validation). Both cost O(L T^3 Pa) per pass, see the module
    docstring; no (T Pa) x (T Pa) matrix is inverted.

    **Arguments:** `damping` (beta in (0, 1]: `new = (1 - beta) old + beta T(old)`), `rtol` (stop when
    the relative change of every order parameter is at most this; None: `1000 eps` of the dtype,
    round-off level in float32 and float64), `max_iters`, `responses` (`False`: the gradient
    independence approximation, A = B = 0 in the fields; THEORY 9), `start` (`"march"` or `"lazy"`),
    `predictions`.

    `Solution.G` has shape `(L, T, 1, T, 1)`, `A` `(L-1, T, Pa, T, 1)`, `B` `(L-1, T, 1, T, Pa)`: the
    size-1 axes are sample indices on which these kernels do not depend (they broadcast). `A` is the
    per-point response: the closure tracks the response to the source `r` shared by all points,
    and spreads it evenly over them.
    """

    damping: float = 1.0
    rtol: float | None = None
    max_iters: int = eqx.field(static=True, default=200)
    responses: bool = eqx.field(static=True, default=True)
    start: str = eqx.field(static=True, default="march")
    predictions: str = eqx.field(static=True, default="readout")

    def estimate(self, problem):
        """`dmft.Estimate` of a solve: XLA's buffers modelled as `(2.25 L - 0.25) (T Pa)^2` elements
        (the materialised Phi and its temporaries) plus `4.1 L T^2 Pa C` (the factored state) plus
        `23 L T^2 (C^2 - 1)` (the march's (T C)^2 matrices beyond one output), fitted to XLA's memory
        analysis of compiled solves (within 8% for C = 1 and 9% for C = 3, 10), plus `3 L T^2 C^2` for
        the read-out (the march's forward rows are computed twice, each pass with its own Sigma,
        DC and DCb); flops of a sweep,
        ~8 L T^3 Pa C^2 (the Psi products), and of the materialisation of Phi, 2 L T C (T Pa)^2. The
        budget is the device."""
        L, T, Pa, C = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0], problem.C
        n = T * Pa
        # C outputs: the factors A, Q grow C-fold and the (T C)^2 matrices of the march C^2-fold.
        elements = (2.25 * L - 0.25) * n * n + 4.1 * L * T * T * Pa * C + 23.0 * L * T * T * (C * C - 1)
        elements += 3.0 * L * T * T * C * C * (self.predictions == "readout")
        flops = {"sweep": 8.0 * L * T**3 * Pa * C * C, "materialise": 2.0 * L * T * C * n * n}
        sizes = {"T Pa": n, "depth": L}
        item = problem.data.Kx.dtype.itemsize
        return costs.Estimate(int(elements * item), costs.budget_bytes(1.0), flops, sizes)

    def validate(self, problem):
        if not isinstance(problem.activation, Linear):
            raise ValueError(
                f"LinearClosure is exact only for linear networks, but the activation is "
                f"{problem.activation.name!r}; use dmft.MonteCarlo(...) for nonlinear networks"
            )
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if self.predictions not in ("euler", "readout"):
            raise ValueError(f'predictions must be "euler" or "readout", got {self.predictions!r}')
        if self.start not in ("march", "lazy"):
            raise ValueError(f'start must be "march" or "lazy", got {self.start!r}')
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"rtol must be None or >= 0, got {self.rtol}")

    def monitor(self, state):
        # Not eps: it is O(gamma0^2 dt^2), round-off at gamma0 = 0, and a function of the rest.
        return state.A, state.Q, state.G, state.beta

    def tolerance(self, state):
        rtol = 1000 * jnp.finfo(state.G.dtype).eps if self.rtol is None else self.rtol
        return rtol, rtol

    def init(self, problem, key):
        if self.start == "march":
            return _march(problem, self.responses, self.predictions == "readout")
        # Lazy start: Phi^l = Phi^0 (zero factors), G^l = 1 (linear networks), no responses.
        L, T, Pa, C = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0], problem.C
        dtype = problem.data.Kx.dtype
        return _State(
            A=jnp.zeros((L, T, Pa, T * C), dtype),
            Q=jnp.zeros((L, T * C, T, Pa), dtype),
            G=jnp.broadcast_to(_readout_G(T, C, dtype), (L, T * C, T * C)),
            beta=jnp.zeros((L - 1, T * C, T * C), dtype),
            eps=jnp.zeros((T, Pa, C), dtype),
        )

    def step(self, problem, state, key):
        return _sweep(problem, state, self.responses, self.predictions == "readout")

    def postprocess(self, problem, state, key):
        net, Kx, C = problem.net, problem.data.Kx, problem.C
        K = _ntk(problem, state)
        f = euler_predictions(problem, K, state.eps)
        Delta = error_signal(problem, K, state.eps)
        L, T, Pa = problem.depth, problem.n_steps + 1, Kx.shape[0]
        split = lambda X, *axes: split_classes(problem, X, axes)
        G_eq = _equal_time_G(state.G, T)[:, :, None, :, None, :]
        G_eq = jnp.broadcast_to(G_eq, (L, T, Pa, C, Pa, C)).reshape(L, T, Pa * C, Pa * C)
        B = jnp.einsum("ltcsd,snd->ltcsn", state.beta.reshape(L - 1, T, C, T, C), Delta)
        return dict(
            **prediction_fields(problem, K, f),
            Phi=_full_Phi(net, Kx, state.A, state.Q),
            G=split(state.G.reshape(L, T, C, T, C), 2, 4),
            Phi_eq=_equal_time_Phi(net, Kx, state.A, state.Q),
            G_eq=split(G_eq, -2, -1),
            A=split(state.A[:-1].reshape(L - 1, T, Pa, T, C) / Pa, -1),
            B=split(B, 2),
        )
