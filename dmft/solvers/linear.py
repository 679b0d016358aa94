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
    Phi^l      = Phi^{l-1} + Abar Q + Q^T Abar^T,                 Q = gamma0^2 R + (gamma0^4 S + gamma0^2 G^{l+1}) Abar^T / 2,
                                                                   R = D Phi^{l-1}.

No (T Pa) x (T Pa) matrix is ever inverted: the only solve is a T x T triangular one, and the cost
per layer is two rank-T products with the (T Pa) x (T Pa) kernel, O(T^3 Pa^2) flops, O(L T^2 Pa^2)
memory. Layer 1 uses the Kronecker structure Phi^0 = 1 1^T (x) Kx; layer L only needs Phi^L at equal
times inside the iteration.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..activations import Linear
from ..dynamics import error_signal, euler_predictions, ntk_from_kernels, prediction_fields
from ..solve import AbstractSolver

__all__ = ["LinearClosure"]


class _State(eqx.Module):
    """Order parameters of the closure in factored form. T = n + 1 times, Pa = P + P_test samples.

    `Phi^l = Phi^0 + sum_{k<=l} (Abar^k Q^k + (Abar^k Q^k)^T)` with `Phi^0 = 1 1^T (x) Kx`, so the
    state carries the rank-T factors instead of the (T Pa)^2 kernels:
    A: (L, T, Pa, T) = Abar^1..Abar^L (Abar^L is only a factor of Phi^L, not a response function);
    Q: (L, T, T, Pa); G: (L, T, T); B: (L-1, T, T, Pa) = Bbar^1..Bbar^{L-1}.
    """

    A: jax.Array
    Q: jax.Array
    G: jax.Array
    B: jax.Array


def _factors(A, Q):
    """Concatenated factors of `Phi^l - Phi^0`: `U (T Pa, l T)` and `W (l T, T Pa)`, `Phi^l = Phi^0 + U W + (U W)^T`."""
    l, T, Pa, _ = A.shape
    U = jnp.transpose(A.reshape(l, T * Pa, T), (1, 0, 2)).reshape(T * Pa, l * T)
    return U, Q.reshape(l * T, T * Pa)


def _apply_Phi(Kx, A, Q, V):
    """`Phi^l V` for `V (T Pa, m)`, with `Phi^l` given by Kx and the factors `A (l, T, Pa, T)`, `Q (l, T, T, Pa)`."""
    T, Pa = A.shape[1:3] if A.shape[0] else (V.shape[0] // Kx.shape[0], Kx.shape[0])
    base = Kx @ jnp.sum(V.reshape(T, Pa, -1), axis=0)  # Phi^0 V is the same at every time t
    out = jnp.tile(base, (T, 1))
    if A.shape[0]:
        U, W = _factors(A, Q)
        out = out + U @ (W @ V) + W.T @ (U.T @ V)
    return out


def _apply_Phi_Delta(Kx, A, Q, Delta):
    """`sum_nu Phi^l_{mu nu}(t, s) Delta_nu(s)` -> (T Pa, T), from the factors (see `_apply_Phi`)."""
    T, Pa = Delta.shape
    out = jnp.tile((Delta @ Kx).T, (T, 1))
    if A.shape[0]:
        U, W = _factors(A, Q)
        W3, U3 = W.reshape(-1, T, Pa), U.reshape(T, Pa, -1)
        WD = jnp.sum(W3 * Delta, axis=-1)  # (l T, T): rows of W contracted with Delta at each s
        UD = jnp.sum(U3 * Delta[:, :, None], axis=1).T  # (l T, T)
        out = out + U @ WD + W.T @ UD
    return out


def _equal_time_Phi(Kx, A, Q):
    """`Phi^l(t, t)` for l = 1..L -> (L, T, Pa, Pa): cumulative sums of the factor products."""
    E = jnp.einsum("ktms,kstn->ktmn", A, Q)
    return Kx + jnp.cumsum(E + jnp.swapaxes(E, -1, -2), axis=0)


def _full_Phi(Kx, A, Q):
    """Two-time `Phi^l(t, s)` for l = 1..L -> (L, T, Pa, T, Pa) (materialised once, after the solve)."""
    L, T, Pa, _ = A.shape
    Phi = jnp.tile(Kx, (T, T))
    out = []
    for l in range(L):  # one rank-2T product per layer; no transpose of a (T Pa)^2 matrix
        U, W = _factors(A[l : l + 1], Q[l : l + 1])
        Phi = Phi + jnp.concatenate([U, W.T], axis=1) @ jnp.concatenate([W, U.T], axis=0)
        out.append(Phi.reshape(T, Pa, T, Pa))
    return jnp.stack(out)


def _ntk(Kx, state):
    G_eq = jnp.diagonal(state.G, axis1=1, axis2=2)[..., None, None]  # (L, T, 1, 1)
    return ntk_from_kernels(Kx, _equal_time_Phi(Kx, state.A, state.Q), G_eq)


def _layer(gamma0, c, Kx, A_low, Q_low, G_next, B_l, Delta, responses=True):
    """Layer l from the factors of Phi^{l-1} (`A_low`, `Q_low`: layers < l), G^{l+1} and Bbar^l.

    Returns Abar^l (T, Pa, T), Q^l (T, T, Pa), G^l (T, T), Bbar^{l-1} (T, T, Pa).
    """
    T, Pa = Delta.shape
    g2 = gamma0**2
    mask = jnp.tril(jnp.ones((T, T), Delta.dtype), -1)  # [s < t]
    A_prev = A_low[-1] if A_low.shape[0] and responses else 0.0  # Abar^{l-1}; Abar^0 = 0
    C = A_prev + c * mask[:, None, :] * _apply_Phi_Delta(Kx, A_low, Q_low, Delta).reshape(T, Pa, T)
    D = B_l + c * (mask * G_next)[:, :, None] * Delta[None, :, :]
    Cf, Df = C.reshape(T * Pa, T), D.reshape(T, T * Pa)
    I = jnp.eye(T, dtype=Delta.dtype)
    Mt = jax.scipy.linalg.solve_triangular(I - g2 * (Df @ Cf), I, lower=True, unit_diagonal=True)
    Abar = Cf @ Mt  # (T Pa, T)
    R = _apply_Phi(Kx, A_low, Q_low, Df.T).T  # D Phi^{l-1}, (T, T Pa)
    S = R @ Df.T
    G = Mt @ (G_next + g2 * S) @ Mt.T
    Q = g2 * R + 0.5 * (g2**2 * S + g2 * G_next) @ Abar.T  # (T, T Pa)
    return Abar.reshape(T, Pa, T), Q.reshape(T, T, Pa), G, (Mt @ Df).reshape(T, T, Pa)


def _sweep(problem, state, responses=True):
    """One Jacobi sweep: every layer from the previous iterate of its neighbours and Delta."""
    L, Kx = problem.depth, problem.data.Kx
    Delta = error_signal(problem, _ntk(problem.data.Kx, state))
    c = problem.dt * problem.eta0 / problem.P
    T, Pa = Delta.shape
    A, Q, G, B = [], [], [], []
    for l in range(L):  # layer l + 1 of THEORY
        G_next = state.G[l + 1] if l + 1 < L else jnp.ones((T, T), Delta.dtype)
        B_l = state.B[l] if l + 1 < L and responses else jnp.zeros((T, T, Pa), Delta.dtype)
        a, q, g, b = _layer(problem.gamma0, c, Kx, state.A[:l], state.Q[:l], G_next, B_l, Delta, responses)
        A.append(a), Q.append(q), G.append(g), B.append(b)
    return _State(A=jnp.stack(A), Q=jnp.stack(Q), G=jnp.stack(G), B=jnp.stack(B[1:]) if L > 1 else state.B)


class LinearClosure(AbstractSolver):
    """Exact DMFT of deep linear networks (activation `"linear"`), any depth, train and test points.

    Solves the discrete-time closure of THEORY sections 4 and 6 (left-point rule, Euler predictions,
    so `gamma0 -> 0` is exactly `Lazy(discrete=True)`) by the damped fixed-point iteration of
    `dmft.solve`. One iteration is one Jacobi sweep over the layers; see the module docstring
    for the structure that makes each sweep cost O(L T^3 Pa^2) with no large inverse.

    **Arguments:** `damping` (beta in (0, 1]: `new = (1 - beta) old + beta T(old)`), `rtol` (stop when
    the relative change of every order parameter is at most this), `max_iters`, `responses`
    (`False`: the gradient independence approximation, A = B = 0 in the fields; THEORY 9).

    `Solution.G` has shape `(L, T, 1, T, 1)`, `A` `(L-1, T, Pa, T, 1)`, `B` `(L-1, T, 1, T, Pa)`: the
    size-1 axes are sample indices on which these kernels do not depend.
    """

    damping: float = 1.0
    rtol: float = 1e-10
    max_iters: int = eqx.field(static=True, default=200)
    responses: bool = eqx.field(static=True, default=True)

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

    def init(self, problem, key):
        # Lazy start: Phi^l = Phi^0 (zero factors), G^l = 1 (linear networks), no responses.
        L, T, Pa = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0]
        dtype = problem.data.Kx.dtype
        return _State(
            A=jnp.zeros((L, T, Pa, T), dtype),
            Q=jnp.zeros((L, T, T, Pa), dtype),
            G=jnp.ones((L, T, T), dtype),
            B=jnp.zeros((L - 1, T, T, Pa), dtype),
        )

    def step(self, problem, state, key):
        return _sweep(problem, state, self.responses)

    def postprocess(self, problem, state, key):
        Kx = problem.data.Kx
        K = _ntk(Kx, state)
        f = euler_predictions(K, problem.data.y, problem.dt, problem.eta0)
        L, T = state.G.shape[:2]
        Pa = Kx.shape[0]
        G_eq = jnp.diagonal(state.G, axis1=1, axis2=2)[..., None, None]
        return dict(
            **prediction_fields(problem, K, f),
            Phi=_full_Phi(Kx, state.A, state.Q),
            G=state.G[:, :, None, :, None],
            Phi_eq=_equal_time_Phi(Kx, state.A, state.Q),
            G_eq=jnp.broadcast_to(G_eq, (L, T, Pa, Pa)),
            A=state.A[:-1, ..., None],
            B=state.B[:, :, None, :, :],
        )
