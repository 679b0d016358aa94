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
from ..dynamics import error_signal, euler_predictions, ntk_from_kernels, prediction_fields
from ..solve import AbstractIterativeSolver

__all__ = ["LinearClosure"]


class _State(eqx.Module):
    """Order parameters of the closure in factored form. T = n + 1 times, Pa = P + P_test samples.

    `Phi^l = Phi^0 + sum_{k<=l} (Abar^k Q^k + (Abar^k Q^k)^T)` with `Phi^0 = 1 1^T (x) Kx`, so the
    state carries the rank-T factors instead of the (T Pa)^2 kernels:
    A: (L, T, Pa, T) = Abar^1..Abar^L (Abar^L is only a factor of Phi^L, not a response function);
    Q: (L, T, T, Pa); G: (L, T, T); beta: (L-1, T, T) with `Bbar^l(t, s, nu) = beta^l(t, s) Delta_nu(s)`.
    """

    A: jax.Array
    Q: jax.Array
    G: jax.Array
    beta: jax.Array


def _contract(X, Delta):
    """`sum_nu X[..., s, nu] Delta_nu(s)`: the contraction `Dc` with the error signal over the last two axes."""
    return jnp.einsum("...sn,sn->...s", X, Delta)


def _psi_increment(A, Q, Delta):
    """`(U W + W^T U^T) Dc^T` for one layer's factors `U = A (T, Pa, T)`, `W = Q (T, T, Pa)` -> (T, Pa, T):
    two (T Pa, T) x (T, T) products."""
    QD = _contract(Q, Delta)  # [r, s]
    AD = jnp.einsum("snr,sn->sr", A, Delta)  # [s, r]
    return jnp.einsum("tmr,rs->tms", A, QD) + jnp.einsum("rtm,sr->tms", Q, AD)


def _psi(net, Kx, A, Q, Delta):
    """`Psi~^l = Phi~^l Dc^T`, l = 0..L-1 -> (L, T, Pa, T): `Psi~^l[t, mu, s] = sum_nu Phi~^l_{mu nu}(t, s) Delta_nu(s)`
    with `Phi~^l = sw2 (Phi~^{l-1} + U W + W^T U^T) + sb2`, from the factors of every layer below
    (O(L T^3 Pa))."""
    L, T, Pa, _ = A.shape
    psi = [jnp.broadcast_to((Delta @ net.preactivation_kernel(Kx)).T, (T, Pa, T))]
    for l in range(L - 1):
        psi.append(_next_psi(net, psi[-1] + _psi_increment(A[l], Q[l], Delta), Delta))
    return jnp.stack(psi)


def _next_psi(net, psi, Delta):
    """`Psi~^l` from `Psi^l = Phi^l Dc^T (..., T)`: `sw2 Psi^l + sb2 sum_nu Delta_nu(s)`."""
    return net.sw2 * psi + net.sigma_b**2 * Delta.sum(1)


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

    One rank-2T product per layer, `[U, W^T] [W; U^T]`, accumulated in a scan whose outputs are
    written straight into the stacked result (a transpose or a stack of (T Pa)^2 matrices each cost
    as much as the product on CPU).
    """
    L, T, Pa, _ = A.shape

    def layer(prev, factors):
        U, W = factors[0].reshape(T * Pa, T), factors[1].reshape(T, T * Pa)
        Phi = prev + jnp.concatenate([U, W.T], axis=1) @ jnp.concatenate([W, U.T], axis=0)
        return net.preactivation_kernel(Phi), Phi

    _, Phi = jax.lax.scan(layer, jnp.tile(net.preactivation_kernel(Kx), (T, T)), (A, Q))
    return Phi.reshape(L, T, Pa, T, Pa)


def _ntk(net, Kx, state):
    G_eq = jnp.diagonal(state.G, axis1=1, axis2=2)[..., None, None]  # (L, T, 1, 1)
    return ntk_from_kernels(net, Kx, _equal_time_Phi(net, Kx, state.A, state.Q), G_eq)


def _unit_lower_inverse(N):
    """`(I - N)^{-1}` for strictly lower-triangular `N (T, T)`: N is nilpotent (N^T = 0), so the inverse
    is the finite Neumann series `sum_{j<T} N^j = prod_{k<K} (I + N^(2^k))`, K = ceil(log2 T).

    2K matrix products instead of a triangular solve: the same result to round-off, and far faster
    under `vmap` on CPU (a batch of five 101 x 101 solves took 53 ms, the products 3 ms).
    """
    I = jnp.eye(N.shape[-1], dtype=N.dtype)
    inverse, power = I + N, N
    for _ in range(max(math.ceil(math.log2(N.shape[-1])) - 1, 0)):
        power = power @ power
        inverse = inverse @ (I + power)
    return inverse


def _layer(g2, c, Delta, A_prev, Psi_prev, G_next, beta):
    """One layer of THEORY 6 from its neighbours as its sources see them (THEORY 11): sw2 Abar^{l-1}
    `A_prev (T, Pa, T)`, `Psi~^{l-1} (T, Pa, T)`, sw2 G^{l+1} `(T, T)`, sw2 beta^l `(T, T)`. Returns
    Abar^l (T, Pa, T), Q^l (T, T, Pa), G^l (T, T), beta^{l-1} (T, T).

    `D^l = d (x) Delta` with `d = beta^l + c [s<t] G^{l+1}`: the backward field responds to a sample only
    through that sample's error signal, so D Phi^{l-1} = d Psi^{l-1 T} and every product is (T Pa) x T x T.
    """
    T, Pa = Delta.shape
    mask = jnp.tril(jnp.ones((T, T), Delta.dtype), -1)  # [s < t]
    C = A_prev + c * mask[:, None, :] * Psi_prev
    d = beta + c * mask * G_next
    Mt = _unit_lower_inverse(g2 * d @ jnp.einsum("sn,snr->sr", Delta, C))  # (I - g2 D C)^{-1}
    Abar = (C.reshape(T * Pa, T) @ Mt).reshape(T, Pa, T)
    Q, S = _Q_factor(g2, d, Psi_prev, G_next, Abar, Delta)
    G = Mt @ (G_next + g2 * S) @ Mt.T
    return Abar, Q, G, Mt @ d


def _Q_factor(g2, d, Psi_prev, G_next, Abar, Delta):
    """`Q^l (T, T, Pa)` of `Phi^l = Phi^{l-1} + Abar Q + Q^T Abar^T`, and `S = D Phi^{l-1} D^T (T, T)`,
    from `d^l (T, T)`, `Psi^{l-1}`, `Abar^l (T, Pa, T)` and `G^{l+1} (T, T)` (module docstring)."""
    T, Pa = Delta.shape
    R = d @ Psi_prev.reshape(T * Pa, T).T  # D Phi^{l-1}, (T, T Pa)
    S = _contract(R.reshape(T, T, Pa), Delta) @ d.T
    Q = g2 * R + 0.5 * (g2**2 * S + g2 * G_next) @ Abar.reshape(T * Pa, T).T
    return Q.reshape(T, T, Pa), S


def _sweep(problem, state, responses=True):
    """One Jacobi sweep: every layer from the previous iterate of its neighbours and the new Delta."""
    net, Kx = problem.net, problem.data.Kx
    Delta = error_signal(problem, _ntk(net, Kx, state))
    c = problem.dt * problem.eta0 / problem.P
    # `_layer` takes the neighbours as the sources see them: sw2 Abar, sw2 G, sw2 beta, Psi~ (THEORY 11).
    on = float(responses) * net.sw2  # gradient independence: Abar = Bbar = 0 in the fields
    A_prev = on * jnp.concatenate([jnp.zeros_like(state.A[:1]), state.A[:-1]])
    G_next = net.sw2 * jnp.concatenate([state.G[1:], jnp.ones_like(state.G[:1])])
    beta = on * jnp.concatenate([state.beta, jnp.zeros_like(state.G[:1])])
    layer = lambda *args: _layer(problem.gamma0**2, c, Delta, *args)
    A, Q, G, beta = jax.vmap(layer)(A_prev, _psi(net, Kx, state.A, state.Q, Delta), G_next, beta)
    return _State(A=A, Q=Q, G=G, beta=beta[1:])


def _march(problem, responses=True):
    """The closure's exact solution in ONE causal pass over time (the block forward substitution).

    Write `g^l = Mt (r + gamma0 d Dc u)`, so that, with `b = Mt d` (`Bbar^{l-1} = b (x) Delta`),
    `G^l = Mt (G^{l+1} + gamma0^2 d Sigma^{l-1} d^T) Mt^T`, `Sigma = Dc Phi Dc^T` (T x T), and
    `Phi^l = Phi^{l-1} + gamma0^2 [Psi^{l-1} (C b)^T + (C b) Psi^{l-1 T} + C G^l C^T]`. Every factor is
    strictly causal, so row t of each order parameter needs only rows < t and row t of the layers
    before it: at each t a downward pass gives d, Mt, b, G^l rows, an upward pass gives C, Abar and
    Psi^l rows (s <= t) and Phi^l(t, t); then the Euler step gives Delta(t + 1). Cost O(L T^3 Pa) for
    the whole solve, no iteration. Returns the fixed point as the iteration's `_State`.
    """
    net, Kx, y, P, L = problem.net, problem.data.Kx, problem.data.y, problem.P, problem.depth
    T, Pa = problem.n_steps + 1, Kx.shape[0]
    g2, c, sw2 = problem.gamma0**2, problem.dt * problem.eta0 / problem.P, net.sw2
    Kt = net.preactivation_kernel(Kx)
    on = float(responses) * sw2
    z = lambda *shape: jnp.zeros(shape, Kx.dtype)
    small = ("DC", "DCb", "d", "Mt", "b", "G", "Sigma")  # (L, T, T) each; rows < t are final
    carry = dict(f=z(Pa), Delta=z(T, Pa), **{name: z(L, T, T) for name in small})
    ones = jnp.ones((T, T), Kx.dtype)

    def set_sym(X, t, row):
        return X.at[t].set(row).at[:, t].set(row)

    def backward_rows(k, t, before):
        """Rows t of d^l, Mt^l, b^l and G^l, from the last layer down (d^l needs b^{l+1}, G^{l+1})."""
        for l in reversed(range(L)):
            G_next = sw2 * (k["G"][l + 1] if l + 1 < L else ones)
            b_next = on * k["b"][l + 1, t] if l + 1 < L else 0.0
            d_row = b_next + c * before * G_next[t]
            d = k["d"][l].at[t].set(d_row)
            Mt_row = (jnp.arange(T) == t) + g2 * (d_row @ k["DC"][l]) @ k["Mt"][l]
            Mt = k["Mt"][l].at[t].set(Mt_row)
            b_row = Mt_row @ d
            vX = Mt_row @ G_next + g2 * (b_row @ k["Sigma"][l]) @ d.T
            k["G"] = k["G"].at[l].set(set_sym(k["G"][l], t, vX @ Mt.T))
            k["d"], k["Mt"], k["b"] = k["d"].at[l].set(d), k["Mt"].at[l].set(Mt), k["b"].at[l, t].set(b_row)
        return k

    def forward_rows(k, t, before, Dt):
        """Rows t of C^l, Abar^l, Psi^l (s <= t) and Phi^l(t, t), from the first layer up."""
        upto = jnp.arange(T) <= t
        psi = (k["Delta"] @ Kt).T  # row t of Psi~^0, (Pa, T)
        Phi_eq, Abar, prev = [], [], Kt
        for l in range(L):
            C_row = (on * Abar[-1] if l else 0.0) + c * before * psi
            DC_row = Dt @ C_row
            Cb = C_row @ k["b"][l]
            k["DC"] = k["DC"].at[l, t].set(DC_row)
            k["DCb"] = k["DCb"].at[l, t].set(DC_row @ k["b"][l])
            Abar.append(C_row @ k["Mt"][l])
            CG = C_row @ k["G"][l]
            Phi_eq.append(prev + g2 * (psi @ Cb.T + Cb @ psi.T + CG @ C_row.T))
            prev = net.preactivation_kernel(Phi_eq[-1])
            if l + 1 < L:
                psi = psi + g2 * (psi @ k["DCb"][l].T + Cb @ k["Sigma"][l] + CG @ k["DC"][l].T)
                psi = upto * _next_psi(net, psi, k["Delta"])
                k["Sigma"] = k["Sigma"].at[l + 1].set(set_sym(k["Sigma"][l + 1], t, Dt @ psi))
        return k, jnp.stack(Phi_eq), jnp.stack(Abar)

    def step(k, t):
        k = dict(k)
        Dt = jnp.zeros(Pa, Kx.dtype).at[:P].set(problem.loss.delta(k["f"][:P], y))
        k["Delta"] = k["Delta"].at[t].set(Dt)
        k["Sigma"] = k["Sigma"].at[0].set(set_sym(k["Sigma"][0], t, k["Delta"] @ Kt @ Dt))
        before = jnp.arange(T) < t
        k, Phi_eq, Abar = forward_rows(backward_rows(k, t, before), t, before, Dt)
        G_eq = jnp.diagonal(k["G"], axis1=1, axis2=2)[:, t]
        K = ntk_from_kernels(net, Kx, Phi_eq[:, None], G_eq[:, None, None, None])[0]
        k["f"] = k["f"] + c * K[:, :P] @ Dt[:P]  # Euler: f(t + 1)
        return k, Abar

    k, Abar = jax.lax.scan(step, carry, jnp.arange(T))
    return _factorise(problem, jnp.moveaxis(Abar, 0, 1), k["G"], k["d"], k["b"], k["Delta"])


def _factorise(problem, Abar, G, d, b, Delta):
    """The iteration's factored `_State` from the marched Abar, G, d, b: `Q^l` needs the full Psi^{l-1}."""
    net, Kx, L = problem.net, problem.data.Kx, problem.depth
    T, Pa = Delta.shape
    g2 = problem.gamma0**2
    psi = jnp.broadcast_to((Delta @ net.preactivation_kernel(Kx)).T, (T, Pa, T))
    Q = []
    for l in range(L):
        G_next = net.sw2 * (G[l + 1] if l + 1 < L else jnp.ones((T, T), Kx.dtype))
        Q.append(_Q_factor(g2, d[l], psi, G_next, Abar[l], Delta)[0])
        if l + 1 < L:
            psi = _next_psi(net, psi + _psi_increment(Abar[l], Q[l], Delta), Delta)
    return _State(A=Abar, Q=jnp.stack(Q), G=G, beta=b[1:])


class LinearClosure(AbstractIterativeSolver):
    """Exact DMFT of deep linear networks (activation `"linear"`), any depth, train and test points.

    Solves the discrete-time closure of THEORY sections 4 and 6 (left-point rule, Euler predictions,
    so `gamma0 -> 0` is exactly `Lazy(discrete=True)`). The closure is causal, so its solution is
    computed exactly in one forward pass over time (`start="march"`, the default); the damped
    fixed-point iteration of `dmft.solve` (one Jacobi sweep over the layers per iteration) then starts
    from it, so its first residual is the marched solution's own fixed-point residual (~1e-15 in
    float64) and one iteration verifies convergence. `start="lazy"` iterates from the lazy kernels
    instead (tens of iterations; for validation). Both cost O(L T^3 Pa) per pass, see the module
    docstring; no (T Pa) x (T Pa) matrix is inverted.

    **Arguments:** `damping` (beta in (0, 1]: `new = (1 - beta) old + beta T(old)`), `rtol` (stop when
    the relative change of every order parameter is at most this; None: `1000 eps` of the dtype,
    round-off level in float32 and float64), `max_iters`, `responses` (`False`: the gradient
    independence approximation, A = B = 0 in the fields; THEORY 9), `start` (`"march"` or `"lazy"`).

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

    def estimate(self, problem):
        """`dmft.Estimate` of a solve: XLA's buffers modelled as `(2.25 L - 0.25) (T Pa)^2` elements
        (the materialised Phi and its temporaries) plus `4.1 L T^2 Pa` (the factored state), fitted to
        XLA's memory analysis of 11 compiled solves (within 8%); flops of a sweep, ~8 L T^3 Pa (the
        Psi products), and of the materialisation of Phi, 2 L T (T Pa)^2. The budget is the device."""
        L, T, Pa = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0]
        n = T * Pa
        elements = (2.25 * L - 0.25) * n * n + 4.1 * L * T * T * Pa
        flops = {"sweep": 8.0 * L * T**3 * Pa, "materialise": 2.0 * L * T * n * n}
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
        if self.start not in ("march", "lazy"):
            raise ValueError(f'start must be "march" or "lazy", got {self.start!r}')
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"rtol must be None or >= 0, got {self.rtol}")

    def tolerance(self, state):
        rtol = 1000 * jnp.finfo(state.G.dtype).eps if self.rtol is None else self.rtol
        return rtol, rtol

    def init(self, problem, key):
        if self.start == "march":
            return _march(problem, self.responses)
        # Lazy start: Phi^l = Phi^0 (zero factors), G^l = 1 (linear networks), no responses.
        L, T, Pa = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0]
        dtype = problem.data.Kx.dtype
        return _State(
            A=jnp.zeros((L, T, Pa, T), dtype),
            Q=jnp.zeros((L, T, T, Pa), dtype),
            G=jnp.ones((L, T, T), dtype),
            beta=jnp.zeros((L - 1, T, T), dtype),
        )

    def step(self, problem, state, key):
        return _sweep(problem, state, self.responses)

    def postprocess(self, problem, state, key):
        net, Kx = problem.net, problem.data.Kx
        K = _ntk(net, Kx, state)
        f = euler_predictions(problem, K)
        Delta = error_signal(problem, K)
        L, T = state.G.shape[:2]
        Pa = Kx.shape[0]
        G_eq = jnp.diagonal(state.G, axis1=1, axis2=2)[..., None, None]
        return dict(
            **prediction_fields(problem, K, f),
            Phi=_full_Phi(net, Kx, state.A, state.Q),
            G=state.G[:, :, None, :, None],
            Phi_eq=_equal_time_Phi(net, Kx, state.A, state.Q),
            G_eq=jnp.broadcast_to(G_eq, (L, T, Pa, Pa)),
            A=state.A[:-1, ..., None] / Pa,
            B=state.beta[:, :, None, :, None] * Delta,
        )
